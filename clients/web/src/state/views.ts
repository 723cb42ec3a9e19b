// The canonical, comparable view of a client's server state: `snapshotView` and its rows.
// A port of threadline_client/state/views.py.

import type { ClientState, Snapshot } from "./models.js";
import { ClientStore } from "./store.js";

/** One thread in a `SnapshotView`. */
export interface ThreadRow {
  readonly title: string;
  readonly description: string;
  readonly tags: readonly string[];
  readonly archived: boolean;
  readonly participants: readonly string[];
  readonly version: number;
  readonly lastSeq: number;
}

/** One message in a `SnapshotView`. */
export interface MessageRow {
  readonly id: string;
  readonly seq: number;
  readonly text: string;
  readonly deleted: boolean;
  readonly version: number;
}

/** The server state a client holds, in a canonical comparable form (no local overlays). */
export interface SnapshotView {
  /** Visible threads by id. */
  readonly threads: ReadonlyMap<string, ThreadRow>;
  /** Per visible thread id, its known messages by `seq` (an empty array if none). */
  readonly messages: ReadonlyMap<string, readonly MessageRow[]>;
}

function isSnapshot(source: ClientState | Snapshot): source is Snapshot {
  return "summaries" in source;
}

/**
 * Returns the canonical view of a client's state or of a freshly loaded snapshot. Only server
 * copies count: pending sends, edits and updates are left out, so a client that has caught up
 * compares equal (e.g. with vitest's toEqual) to a fresh snapshot of the same user.
 */
export function snapshotView(source: ClientState | Snapshot): SnapshotView {
  let state: ClientState;
  if (isSnapshot(source)) {
    const store = new ClientStore();
    store.applySnapshot(source, { epoch: "", changeSeq: 0 });
    state = store.state;
  } else {
    state = source;
  }
  const threads = new Map<string, ThreadRow>();
  const messages = new Map<string, readonly MessageRow[]>();
  for (const [tid, view] of state.threads.byId) {
    const s = view.server;
    threads.set(tid, {
      title: s.title,
      description: s.description,
      tags: [...s.tags],
      archived: s.archived,
      participants: [...s.participantIds].sort(),
      version: Number(s.version),
      lastSeq: view.lastSeq,
    });
    const rows: MessageRow[] = [];
    for (const m of state.messages.byThread.get(tid) ?? []) {
      if (m.server === null) continue;
      const v = m.server;
      rows.push({
        id: v.id,
        seq: Number(v.seq),
        text: v.text,
        deleted: v.deleted,
        version: Number(v.version),
      });
    }
    rows.sort((a, b) => a.seq - b.seq);
    messages.set(tid, rows);
  }
  return { threads, messages };
}
