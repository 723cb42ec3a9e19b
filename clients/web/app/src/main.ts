// The Threadline web chat app: sign in, then one ThreadlineSession (the TypeScript SDK over
// grpc-web) keeps the page's state in sync; the view re-renders from it on every change.
import "./style.css";
import { ThreadlineClient, ThreadlineSession, type LocalMessage } from "../../src/index.js";
import { conflictDialog } from "./conflict.js";
import { byId, h } from "./dom.js";
import { loadConfig, signIn } from "./signin.js";
import { download, uploadFile } from "./uploads.js";
import { render, shell, type ViewActions } from "./views.js";

// A typing signal is repeated while the user keeps typing and withdrawn after this long idle.
const TYPING_IDLE_MS = 4000;
const TYPING_REPEAT_MS = 3000;

function showError(text: string): void {
  const banner = byId("banner");
  banner.hidden = false;
  banner.dataset["state"] = "error";
  banner.textContent = text;
}

async function main(): Promise<void> {
  const root = byId("app");
  const config = await loadConfig();
  const user = await signIn(config, root);
  const client = new ThreadlineClient({ baseUrl: config.grpcWebUrl, token: user.token });
  const session = new ThreadlineSession(client, { resolver: conflictDialog, clientName: "threadline-web-app" });

  let editing: LocalMessage | null = null;
  let typingSince = 0;
  let typingTimer: ReturnType<typeof setTimeout> | undefined;

  const text = h("textarea", { id: "composer-text", name: "text", rows: 2, "aria-label": "Message", placeholder: "Write a message…" });
  const file = h("input", { type: "file", id: "composer-file", "aria-label": "Attach a file" });
  const editingNote = h("p", { class: "editing", id: "editing-note", hidden: true });
  const sendButton = h("button", { type: "submit", class: "primary", id: "send" }, "Send");
  const composer = h("form", { class: "composer", id: "composer" }, editingNote, text, h("div", { class: "row" }, file, sendButton));

  const stopTyping = () => {
    clearTimeout(typingTimer);
    const threadId = session.state.ui.activeThread;
    if (typingSince && threadId) void session.typing(threadId, false);
    typingSince = 0;
  };
  const cancelEdit = () => {
    editing = null;
    editingNote.hidden = true;
    sendButton.textContent = "Send";
  };

  const actions: ViewActions = {
    openThread(threadId) {
      stopTyping();
      cancelEdit();
      session.setActiveThread(threadId);
      text.focus();
    },
    newThread() {
      openNewThreadDialog(session);
    },
    loadOlder(threadId) {
      void session.loadMore(threadId).catch((e: unknown) => showError(String(e)));
    },
    startEdit(message) {
      editing = message;
      text.value = message.text;
      editingNote.hidden = false;
      editingNote.replaceChildren("Editing a message ", h("button", { type: "button", class: "link", onclick: () => (cancelEdit(), (text.value = "")) }, "Cancel"));
      sendButton.textContent = "Save";
      text.focus();
    },
    remove(message) {
      if (confirm("Delete this message?")) session.delete(message.id || message.localId);
    },
    retry(message) {
      session.retry(message.localId);
    },
    dismiss(message) {
      session.dismissFailed(message.localId);
    },
    download(uploadId, fileName) {
      void download(client, uploadId, fileName).catch((e: unknown) => showError(String(e)));
    },
    toggleArchived(thread) {
      session.archive(thread.id, !thread.archived);
    },
    reconnect() {
      session.start();
    },
    signOut() {
      void session.stop().then(() => user.signOut());
    },
  };

  const regions = shell(root, user.userId, composer, actions);

  text.addEventListener("input", () => {
    const threadId = session.state.ui.activeThread;
    if (!threadId || editing) return;
    const now = Date.now();
    if (now - typingSince > TYPING_REPEAT_MS) {
      typingSince = now;
      void session.typing(threadId, true);
    }
    clearTimeout(typingTimer);
    typingTimer = setTimeout(stopTyping, TYPING_IDLE_MS);
  });
  text.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      composer.requestSubmit();
    }
  });
  composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const threadId = session.state.ui.activeThread;
    const body = text.value.trim();
    const chosen = file.files?.[0];
    if (!threadId || (!body && !chosen)) return;
    stopTyping();
    if (editing) {
      if (body && body !== editing.text) session.edit(editing.id || editing.localId, body);
      cancelEdit();
      text.value = "";
      return;
    }
    text.value = "";
    if (!chosen) {
      session.send(threadId, body);
      return;
    }
    file.value = "";
    sendButton.disabled = true;
    sendButton.textContent = "Uploading…";
    void uploadFile(client, chosen)
      .then((uploadId) => session.send(threadId, body, [uploadId]))
      .catch((e: unknown) => {
        if (!text.value) text.value = body; // keep what the user wrote for another try
        showError(`Upload failed: ${String(e)}`);
      })
      .finally(() => {
        sendButton.disabled = false;
        sendButton.textContent = "Send";
      });
  });

  // Read markers: the open thread is read while the page is visible.
  const markRead = () => {
    const threadId = session.state.ui.activeThread;
    const thread = threadId ? session.state.threads.byId.get(threadId) : undefined;
    if (!thread || document.visibilityState !== "visible" || session.connection !== "online") return;
    if (thread.readSeq < thread.lastSeq) session.markRead(thread.id);
  };
  document.addEventListener("visibilitychange", markRead);

  let scheduled = false;
  session.store.subscribe(() => {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => {
      scheduled = false;
      render(session, regions, actions);
      markRead();
    });
  });
  render(session, regions, actions);
  session.start();
  (window as unknown as { threadline: unknown }).threadline = { session, client };
}

function openNewThreadDialog(session: ThreadlineSession): void {
  const dialog = byId<HTMLDialogElement>("new-thread-dialog");
  const title = h("input", { id: "new-thread-title-input", name: "title", required: true, maxlength: 200 });
  const people = h("input", { id: "new-thread-participants", name: "participants", placeholder: "bob, carol" });
  const error = h("p", { class: "error", role: "alert" });
  const form = h(
    "form",
    { method: "dialog" },
    h("h2", { id: "new-thread-title" }, "New thread"),
    h("label", { for: "new-thread-title-input" }, "Title"),
    title,
    h("label", { for: "new-thread-participants" }, "Participants (user names, comma-separated)"),
    people,
    error,
    h(
      "div",
      { class: "actions" },
      h("button", { type: "button", onclick: () => dialog.close() }, "Cancel"),
      h("button", { type: "submit", class: "primary", id: "create-thread" }, "Create"),
    ),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const ids = people.value.split(",").map((p) => p.trim()).filter(Boolean);
    void session.createThread(title.value.trim(), ids).then(
      (thread) => {
        dialog.close();
        session.setActiveThread(thread.id);
      },
      (failure: unknown) => {
        error.textContent = failure instanceof Error ? failure.message : String(failure);
      },
    );
  });
  dialog.replaceChildren(form);
  dialog.showModal();
  title.focus();
}

main().catch((error: unknown) => {
  console.error(error);
  showError(`Threadline could not start: ${error instanceof Error ? error.message : String(error)}`);
});
