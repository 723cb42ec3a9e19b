"""`ClientStore`, the public reducer: its parts assembled, plus connection and UI setters."""

from __future__ import annotations

from threadline_client.state._common import _Delta
from threadline_client.state.models import Change, ChangeKind, ConnectionState, OpError, Snapshot
from threadline_client.state.optimistic import _OptimisticOps


class ClientStore(_OptimisticOps):
    """Holds a `ClientState` and applies everything that changes it; observable.

    Every public mutator is synchronous, does no I/O, and notifies subscribers (synchronously,
    in order) and `changes()` iterators once with a `Change`. Methods that only ignore their
    input (duplicates, stale versions) notify nothing.

    Args:
        user_id: The signed-in user, if known before the first Welcome (it decides which
            messages count as unread).
    """

    # -- connection and ui ------------------------------------------------------------------

    def set_connection(self, connection: ConnectionState) -> None:
        """Sets the connection state (and `user.online`); notifies only on a real change."""
        if self.state.connection is connection:
            return
        self.state.connection = connection
        self.state.user.online = connection is ConnectionState.ONLINE
        self._notify(Change(ChangeKind.CONNECTION, connection=connection))

    def set_active_thread(self, thread_id: str | None) -> None:
        """Sets the thread the user has open."""
        self.state.ui.active_thread = thread_id
        self._commit(_Delta(), ChangeKind.UI, always=True)

    def set_loading(self, key: str, loading: bool) -> None:
        """Sets or clears a loading flag (`snapshot`, `history:<thread_id>`, ...)."""
        if loading:
            self.state.ui.loading_states[key] = True
        else:
            self.state.ui.loading_states.pop(key, None)
        self._commit(_Delta(), ChangeKind.UI, always=True)

    def add_error(self, source: str, error: OpError) -> None:
        """Appends an error to `ui.errors` (the oldest beyond 50 are dropped)."""
        self._push_error(source, error)
        self._commit(_Delta(), ChangeKind.UI, always=True)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_snapshot(
        cls, snapshot: Snapshot, *, epoch: str = "", change_seq: int = 0, user_id: str = ""
    ) -> ClientStore:
        """A new store holding a snapshot."""
        store = cls(user_id)
        store.apply_snapshot(snapshot, epoch=epoch, change_seq=change_seq)
        return store
