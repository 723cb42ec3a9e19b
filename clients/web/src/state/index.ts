// Client-side state for Threadline apps: `ClientState`, the reducer that maintains it
// (`ClientStore`), and views. A port of the Python SDK's threadline_client.state.
//
// Rules the reducer follows (the server's sync contract):
// * Version rule: a message or thread from an event, result or conflict replaces the local copy
//   only when its `version` is higher; events at or below the applied change cursor are skipped.
// * Read markers merge by maximum: a stale marker never makes read messages unread.
// * Optimistic operations show at once as overlays on the server copy; a `LocalMessage` keeps a
//   stable `localId` (the op id of a send), so the server's version updates the same object in
//   place. A rejection removes the overlay and lands in `messages.failed` / `ui.errors`; a
//   conflict is reported in the change's outcomes for the session's resolver.
// * int64 fields of the state (seq, version, cursors) are numbers; protos keep bigint.

export {
  ChangeKind,
  ClientState,
  ConflictInfo,
  ConnectionState,
  fieldPaths,
  LocalMessage,
  MessagesState,
  MessageStatus,
  OpError,
  OpKind,
  OpOutcome,
  OpsState,
  OpStatus,
  PendingOp,
  resourceKind,
  SyncInfo,
  THREAD_UPDATE_FIELDS,
  ThreadsState,
  ThreadView,
  UiError,
  UiState,
  UserState,
} from "./models.js";
export type {
  Change,
  LocalMessageInit,
  PendingOpInit,
  Resource,
  Snapshot,
  ThreadFields,
} from "./models.js";
export { InvalidOperationError, newOpId, UnknownItemError } from "./common.js";
export type { StoreClock } from "./common.js";
export type { StoreOptions } from "./core.js";
export type { SubscriberErrorHandler } from "./notify.js";
export type { CreateThreadOptions, QueueOnVersionOptions, QueueOptions } from "./optimistic.js";
export { ClientStore } from "./store.js";
export { snapshotView } from "./views.js";
export type { MessageRow, SnapshotView, ThreadRow } from "./views.js";
