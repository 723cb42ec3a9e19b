// `ClientStore`, the public reducer: its parts assembled, plus connection and UI setters.
// A port of threadline_client/state/store.py.

import { Delta, makeChange } from "./common.js";
import type { StoreOptions } from "./core.js";
import { ChangeKind, ConnectionState } from "./models.js";
import type { OpError, Snapshot } from "./models.js";
import { OptimisticOps } from "./optimistic.js";

/**
 * Holds a `ClientState` and applies everything that changes it; observable.
 *
 * Every public mutator is synchronous, does no I/O, and notifies subscribers (synchronously, in
 * order) and `changes()` iterators once with a `Change`. Methods that only ignore their input
 * (duplicates, stale versions) notify nothing. State objects are mutated in place, so a UI may
 * keep a reference to a `LocalMessage` or `ThreadView` and re-render it on a notification.
 */
export class ClientStore extends OptimisticOps {
  // -- connection and ui ------------------------------------------------------------------

  /** Sets the connection state (and `user.online`); notifies only on a real change. */
  setConnection(connection: ConnectionState): void {
    if (this.state.connection === connection) return;
    this.state.connection = connection;
    this.state.user.online = connection === ConnectionState.ONLINE;
    this.notify(makeChange(ChangeKind.CONNECTION, { connection }));
  }

  /** Sets the thread the user has open. */
  setActiveThread(threadId: string | null): void {
    this.state.ui.activeThread = threadId;
    this.commitAlways(new Delta(), ChangeKind.UI);
  }

  /** Sets or clears a loading flag (`snapshot`, `history:<thread_id>`, ...). */
  setLoading(key: string, loading: boolean): void {
    if (loading) this.state.ui.loadingStates.set(key, true);
    else this.state.ui.loadingStates.delete(key);
    this.commitAlways(new Delta(), ChangeKind.UI);
  }

  /** Appends an error to `ui.errors` (the oldest beyond 50 are dropped). */
  addError(source: string, error: OpError): void {
    this.pushError(source, error);
    this.commitAlways(new Delta(), ChangeKind.UI);
  }

  // -- construction -----------------------------------------------------------------------

  /** A new store holding a snapshot. */
  static fromSnapshot(
    snapshot: Snapshot,
    options: StoreOptions & { epoch?: string; changeSeq?: number | bigint } = {},
  ): ClientStore {
    const store = new ClientStore(options);
    store.applySnapshot(snapshot, { epoch: options.epoch ?? "", changeSeq: options.changeSeq ?? 0 });
    return store;
  }
}
