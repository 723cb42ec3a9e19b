// Change notifications of a store: `subscribe` callbacks and `changes()` iterators.
// A port of threadline_client/state/notify.py.

import type { Change } from "./models.js";

/** Called with an exception a subscriber threw (default: console.error). */
export type SubscriberErrorHandler = (error: unknown) => void;

interface ChangeQueue {
  readonly items: Change[];
  /** Pending next() calls waiting for an item (woken all at once; each checks again). */
  readonly waiters: (() => void)[];
}

/** Delivers each `Change` to subscribers (synchronously, in order) and to `changes()`. */
export class Notifier {
  private readonly subscribers: ((change: Change) => void)[] = [];
  /** @internal Buffers of the open `changes()` iterators. */
  protected readonly queues = new Set<ChangeQueue>();
  private readonly onSubscriberError: SubscriberErrorHandler;

  constructor(onSubscriberError?: SubscriberErrorHandler) {
    this.onSubscriberError =
      onSubscriberError ?? ((error) => console.error("state subscriber failed", error));
  }

  /**
   * Calls `callback(change)` after every change, synchronously; returns an unsubscriber.
   * An exception in a callback is reported (see the store's `onSubscriberError`) and does not
   * stop the others.
   */
  subscribe(callback: (change: Change) => void): () => void {
    this.subscribers.push(callback);
    return () => {
      const index = this.subscribers.indexOf(callback);
      if (index >= 0) this.subscribers.splice(index, 1);
    };
  }

  /**
   * Yields every change from the first `next()` call on (buffered without bound). Each iterator
   * has its own buffer, released when the iterator is closed (`return()`, or leaving a
   * `for await` loop).
   */
  changes(): AsyncIterableIterator<Change> {
    const queues = this.queues;
    let queue: ChangeQueue | null = null;
    let closed = false;
    const done = (): IteratorResult<Change> => ({ done: true, value: undefined });
    const wake = (q: ChangeQueue): void => {
      for (const resolve of q.waiters.splice(0)) resolve();
    };
    const close = (): void => {
      closed = true;
      if (queue !== null) {
        queues.delete(queue);
        wake(queue);
      }
    };
    const iterator: AsyncIterableIterator<Change> = {
      async next(): Promise<IteratorResult<Change>> {
        if (closed) return done();
        if (queue === null) {
          queue = { items: [], waiters: [] };
          queues.add(queue);
        }
        const q = queue;
        for (;;) {
          const change = q.items.shift();
          if (change !== undefined) return { done: false, value: change };
          await new Promise<void>((resolve) => q.waiters.push(resolve));
          if (closed) return done();
        }
      },
      async return(): Promise<IteratorResult<Change>> {
        close();
        return done();
      },
      [Symbol.asyncIterator]() {
        return iterator;
      },
    };
    return iterator;
  }

  /** @internal */
  protected notify(change: Change): void {
    for (const callback of [...this.subscribers]) {
      try {
        callback(change);
      } catch (error) {
        this.onSubscriberError(error);
      }
    }
    for (const queue of this.queues) {
      queue.items.push(change);
      for (const resolve of queue.waiters.splice(0)) resolve();
    }
  }
}
