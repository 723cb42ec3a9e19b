// The chat screen, rendered from the SDK's ClientState on every change. Regions re-render as a
// whole (a chat page holds at most a few hundred rows); the composer is built once so typing is
// never interrupted.
import type { ClientState, LocalMessage, ThreadView, ThreadlineSession } from "../../src/index.js";
import { byId, h, replaceChildren, shortTime } from "./dom.js";

export interface ViewActions {
  openThread(threadId: string): void;
  newThread(): void;
  loadOlder(threadId: string): void;
  startEdit(message: LocalMessage): void;
  remove(message: LocalMessage): void;
  retry(message: LocalMessage): void;
  dismiss(message: LocalMessage): void;
  download(uploadId: string, fileName: string): void;
  toggleArchived(thread: ThreadView): void;
  reconnect(): void;
  signOut(): void;
}

export interface Regions {
  threads: HTMLElement;
  archived: HTMLElement;
  archivedCount: HTMLElement;
  header: HTMLElement;
  older: HTMLButtonElement;
  messages: HTMLElement;
  typing: HTMLElement;
  composer: HTMLFormElement;
  empty: HTMLElement;
  pane: HTMLElement;
}

/** Builds the static layout once; returns the regions `render` fills. */
export function shell(root: HTMLElement, userId: string, composer: HTMLFormElement, actions: ViewActions): Regions {
  const threads = h("ul", { class: "thread-list", id: "threads", "aria-label": "Threads" });
  const archived = h("ul", { class: "thread-list", id: "archived-threads", "aria-label": "Archived threads" });
  const archivedCount = h("span", { class: "count" });
  const header = h("header", { class: "thread-header", id: "thread-header" });
  const older = h("button", { type: "button", class: "older", id: "load-older" }, "Load older messages");
  const messages = h("ol", { class: "messages", id: "messages", "aria-live": "polite", "aria-label": "Messages" });
  const typing = h("p", { class: "typing", id: "typing", "aria-live": "polite" });
  const empty = h("p", { class: "empty", id: "no-thread" }, "Choose a thread, or start a new one.");
  const pane = h("section", { class: "thread", id: "thread-pane", hidden: true }, header, older, messages, typing, composer);
  const sidebar = h(
    "nav",
    { class: "sidebar", "aria-label": "Threads" },
    h(
      "div",
      { class: "me" },
      h("span", { id: "me", "data-user": userId }, `Signed in as ${userId}`),
      h("button", { type: "button", class: "link", onclick: () => actions.signOut() }, "Sign out"),
    ),
    h("button", { type: "button", id: "new-thread", class: "primary", onclick: () => actions.newThread() }, "New thread"),
    h("h2", {}, "Threads"),
    threads,
    h("details", { id: "archived" }, h("summary", {}, "Archived ", archivedCount), archived),
  );
  replaceChildren(root, sidebar, h("div", { class: "main" }, empty, pane));
  root.removeAttribute("aria-busy");
  return { threads, archived, archivedCount, header, older, messages, typing, composer, empty, pane };
}

const BANNER_TEXT: Record<string, string> = {
  connecting: "Connecting…",
  syncing: "Syncing…",
  reconnecting: "Connection lost. Reconnecting…",
  offline: "Offline.",
};

export function renderBanner(state: ClientState, actions: ViewActions): void {
  const banner = byId("banner");
  banner.dataset["state"] = state.connection;
  if (state.connection === "online") {
    banner.hidden = true;
    banner.replaceChildren("Online");
    return;
  }
  banner.hidden = false;
  replaceChildren(
    banner,
    BANNER_TEXT[state.connection] ?? state.connection,
    state.connection === "offline" && h("button", { type: "button", onclick: () => actions.reconnect() }, "Reconnect"),
  );
}

function threadItem(thread: ThreadView, state: ClientState, actions: ViewActions): HTMLElement {
  const active = state.ui.activeThread === thread.id;
  const others = thread.participantIds.filter((p) => p !== state.user.id);
  const anyoneOnline = others.some((p) => state.ui.online.has(p));
  const unread = thread.unreadCount;
  return h(
    "li",
    {},
    h(
      "button",
      {
        type: "button",
        class: active ? "thread-item active" : "thread-item",
        "aria-current": active ? "true" : null,
        "data-thread-id": thread.id,
        onclick: () => actions.openThread(thread.id),
      },
      h("span", { class: anyoneOnline ? "presence online" : "presence", "aria-hidden": "true" }),
      h("span", { class: "title" }, thread.title || others.join(", ") || "(untitled)"),
      unread > 0 && h("span", { class: "badge", "data-testid": "unread", "aria-label": `${unread} unread` }, String(unread)),
    ),
  );
}

function messageItem(message: LocalMessage, state: ClientState, actions: ViewActions): HTMLElement {
  const mine = message.authorId === state.user.id;
  const status = message.status;
  const attachments = message.server?.attachments ?? [];
  const editable = mine && !message.deleted && message.server !== null && status !== "failed";
  return h(
    "li",
    {
      class: `message ${mine ? "mine" : "theirs"} ${status}${message.deleted ? " deleted" : ""}`,
      "data-local-id": message.localId,
      "data-status": status,
    },
    h(
      "div",
      { class: "meta" },
      h("span", { class: "author" }, message.authorId),
      h("time", {}, shortTime(message.createTime)),
      message.edited && h("span", { class: "edited" }, "(edited)"),
      status === "pending" && h("span", { class: "state" }, "sending…"),
    ),
    h("p", { class: "text" }, message.deleted ? "This message was deleted." : message.text),
    attachments.length > 0 &&
      h(
        "ul",
        { class: "attachments" },
        ...attachments.map((a) =>
          h(
            "li",
            {},
            h(
              "button",
              { type: "button", class: "link attachment", "data-upload-id": a.uploadId, onclick: () => actions.download(a.uploadId, a.fileName) },
              `⬇ ${a.fileName}`,
            ),
          ),
        ),
      ),
    status === "failed" &&
      h(
        "p",
        { class: "failure", role: "alert" },
        `Not sent: ${message.error?.message ?? "failed"}${message.error?.reason ? ` (${message.error.reason})` : ""} `,
        h("button", { type: "button", class: "retry", onclick: () => actions.retry(message) }, "Retry"),
        h("button", { type: "button", class: "link", onclick: () => actions.dismiss(message) }, "Dismiss"),
      ),
    editable &&
      h(
        "div",
        { class: "tools" },
        h("button", { type: "button", class: "link edit", onclick: () => actions.startEdit(message) }, "Edit"),
        h("button", { type: "button", class: "link delete", onclick: () => actions.remove(message) }, "Delete"),
      ),
  );
}

/** Messages shown for a thread: confirmed and pending ones, then failed sends of this thread. */
export function threadMessages(state: ClientState, threadId: string): LocalMessage[] {
  const shown = [...(state.messages.byThread.get(threadId) ?? [])];
  for (const failed of state.messages.failed) {
    if (failed.threadId === threadId && failed.op === "send_message") shown.push(failed);
  }
  return shown;
}

export function render(session: ThreadlineSession, regions: Regions, actions: ViewActions): void {
  const state = session.state;
  renderBanner(state, actions);
  replaceChildren(regions.threads, ...state.threads.active.map((t) => threadItem(t, state, actions)));
  replaceChildren(regions.archived, ...state.threads.archived.map((t) => threadItem(t, state, actions)));
  regions.archivedCount.textContent = state.threads.archived.length ? `(${state.threads.archived.length})` : "";
  const threadId = state.ui.activeThread;
  const thread = threadId ? state.threads.byId.get(threadId) : undefined;
  regions.pane.hidden = !thread;
  regions.empty.hidden = Boolean(thread);
  if (!thread || !threadId) return;
  const others = thread.participantIds.filter((p) => p !== state.user.id);
  replaceChildren(
    regions.header,
    h("h1", { id: "thread-title" }, thread.title || others.join(", ") || "(untitled)"),
    h(
      "ul",
      { class: "participants", "aria-label": "Participants" },
      ...thread.participantIds.map((p) =>
        h(
          "li",
          { "data-user": p, "data-online": String(p === state.user.id || state.ui.online.has(p)) },
          h("span", { class: p === state.user.id || state.ui.online.has(p) ? "presence online" : "presence", "aria-hidden": "true" }),
          p,
          h("span", { class: "visually-hidden" }, state.ui.online.has(p) ? " (online)" : " (offline)"),
        ),
      ),
    ),
    h("button", { type: "button", class: "link", id: "archive-toggle", onclick: () => actions.toggleArchived(thread) }, thread.archived ? "Unarchive" : "Archive"),
  );
  const messages = threadMessages(state, threadId);
  const oldest = messages.find((m) => m.server !== null)?.seq ?? 0;
  regions.older.hidden = !(oldest > 1);
  regions.older.disabled = Boolean(state.ui.loadingStates.get(`history:${threadId}`));
  regions.older.onclick = () => actions.loadOlder(threadId);
  const atBottom = regions.messages.scrollHeight - regions.messages.scrollTop - regions.messages.clientHeight < 40;
  replaceChildren(regions.messages, ...messages.map((m) => messageItem(m, state, actions)));
  if (atBottom) regions.messages.scrollTop = regions.messages.scrollHeight;
  const typing = [...(state.ui.typing.get(threadId) ?? [])].filter((u) => u !== state.user.id);
  regions.typing.textContent =
    typing.length === 0 ? "" : typing.length === 1 ? `${typing[0]} is typing…` : `${typing.join(", ")} are typing…`;
}
