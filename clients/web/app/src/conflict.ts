// The client-side conflict resolution UI: when the server could not merge a concurrent edit,
// show both versions and let the user keep theirs, keep the other, or merge by hand.
import type { ConflictInfo, Resolution } from "../../src/index.js";
import { byId, h } from "./dom.js";

function textOf(resource: unknown): string {
  return typeof resource === "object" && resource !== null && "text" in resource ? String((resource as { text: unknown }).text) : "";
}

function titleOf(resource: unknown): string {
  return typeof resource === "object" && resource !== null && "title" in resource ? String((resource as { title: unknown }).title) : "";
}

/** A resolver for `ThreadlineSession` that asks the user in a modal dialog. */
export function conflictDialog(info: ConflictInfo): Promise<Resolution> {
  const dialog = byId<HTMLDialogElement>("conflict-dialog");
  const isMessage = info.resource === "message";
  const theirs = isMessage ? textOf(info.server) : titleOf(info.server);
  const mine = isMessage ? textOf(info.client) : titleOf(info.client);
  const field = isMessage ? "text" : "title";
  const merged = h("textarea", { id: "conflict-merged", rows: 3, "aria-label": "Merged version" });
  merged.value = mine;
  return new Promise((resolve) => {
    const finish = (value: Resolution) => {
      dialog.close();
      resolve(value);
    };
    dialog.replaceChildren(
      h("h2", { id: "conflict-title" }, isMessage ? "This message was changed meanwhile" : "This thread was changed meanwhile"),
      h("p", {}, "Someone else saved a different version while your change was on its way."),
      h("h3", {}, "Their version"),
      h("blockquote", { class: "theirs", "data-testid": "conflict-theirs" }, theirs),
      h("h3", {}, "Your version"),
      h("blockquote", { class: "mine", "data-testid": "conflict-mine" }, mine),
      h("label", { for: "conflict-merged" }, "Or merge them:"),
      merged,
      h(
        "div",
        { class: "actions" },
        h("button", { type: "button", onclick: () => finish(null) }, "Keep theirs"),
        h("button", { type: "button", onclick: () => finish({ [field]: mine }) }, "Keep mine"),
        h("button", { type: "button", onclick: () => finish({ [field]: merged.value }) }, "Save merged"),
      ),
    );
    dialog.addEventListener("cancel", () => resolve(null), { once: true });
    dialog.showModal();
  });
}
