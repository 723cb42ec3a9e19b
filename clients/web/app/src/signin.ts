// Where the app's server is and how the user signs in: the embedded default's dev sign-in
// (choose a user name; the server's embedded issuer mints a token) or Clerk's session token.
import type { TokenProvider } from "../../src/index.js";
import { h } from "./dom.js";

export interface AppConfig {
  /** The grpc-web edge the app calls. */
  grpcWebUrl: string;
  authMode: "embedded" | "clerk";
  devSignIn: boolean;
  clerkPublishableKey: string;
}

/** Reads `/app-config.json` (served by `threadline serve` beside the app). */
export async function loadConfig(): Promise<AppConfig> {
  const response = await fetch("/app-config.json", { headers: { accept: "application/json" } });
  if (!response.ok) throw new Error(`app-config.json: HTTP ${response.status}`);
  const raw = (await response.json()) as Record<string, unknown>;
  return {
    grpcWebUrl: String(raw["grpc_web_url"] ?? ""),
    authMode: raw["auth_mode"] === "clerk" ? "clerk" : "embedded",
    devSignIn: raw["dev_sign_in"] === true,
    clerkPublishableKey: String(raw["clerk_publishable_key"] ?? ""),
  };
}

const USER_KEY = "threadline.user";

export interface SignedIn {
  userId: string;
  token: TokenProvider;
  signOut(): Promise<void>;
}

/** A token provider that asks the dev sign-in endpoint for a fresh token each time. */
function devTokens(userId: string): TokenProvider {
  return async () => {
    const response = await fetch("/auth/dev-token", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user_id: userId }),
    });
    const body = (await response.json().catch(() => ({}))) as { token?: string; error?: string };
    if (!response.ok || !body.token) throw new Error(body.error ?? `dev sign-in: HTTP ${response.status}`);
    return body.token;
  };
}

/** Shows the sign-in form (or reuses this tab's earlier choice) and resolves once signed in. */
export async function signIn(config: AppConfig, root: HTMLElement): Promise<SignedIn> {
  if (config.authMode === "clerk") return clerkSignIn(config, root);
  if (!config.devSignIn) {
    root.replaceChildren(h("p", { class: "notice" }, "Sign-in is not available on this server."));
    return new Promise(() => undefined);
  }
  const remembered = sessionStorage.getItem(USER_KEY);
  const signOut = async () => {
    sessionStorage.removeItem(USER_KEY);
    location.reload();
  };
  if (remembered) return { userId: remembered, token: devTokens(remembered), signOut };
  return new Promise((resolve) => {
    const error = h("p", { class: "error", role: "alert", id: "signin-error" });
    const input = h("input", {
      id: "signin-user",
      name: "user",
      autocomplete: "username",
      required: true,
      pattern: "[A-Za-z0-9_.@:\\-]{1,128}",
      title: "Letters, digits and _ . @ : - (up to 128)",
      placeholder: "e.g. alice",
    });
    const form = h(
      "form",
      { class: "signin", "aria-labelledby": "signin-title" },
      h("h1", { id: "signin-title" }, "Sign in to Threadline"),
      h("p", {}, "Development sign-in: choose any user name. The server's embedded issuer signs a token for it."),
      h("label", { for: "signin-user" }, "User name"),
      input,
      h("button", { type: "submit" }, "Sign in"),
      error,
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const userId = input.value.trim();
      const tokens = devTokens(userId);
      void Promise.resolve(tokens()).then(
        () => {
          sessionStorage.setItem(USER_KEY, userId);
          resolve({ userId, token: tokens, signOut });
        },
        (failure: unknown) => {
          error.textContent = failure instanceof Error ? failure.message : String(failure);
        },
      );
    });
    root.replaceChildren(form);
    root.removeAttribute("aria-busy");
    input.focus();
  });
}

interface ClerkGlobal {
  load(): Promise<void>;
  user: { id: string } | null;
  session: { getToken(): Promise<string | null> } | null;
  mountSignIn(element: HTMLElement): void;
  addListener(listener: (resources: { user?: { id: string } | null }) => void): void;
  signOut(): Promise<void>;
}

/** The Frontend API host a Clerk publishable key names (`pk_test_<base64 of host$>`). */
export function clerkFrontendApi(publishableKey: string): string {
  const encoded = publishableKey.split("_")[2] ?? "";
  return atob(encoded).replace(/\$$/, "");
}

/** Clerk mode: the page's Clerk session (clerk-js from the instance's Frontend API). */
async function clerkSignIn(config: AppConfig, root: HTMLElement): Promise<SignedIn> {
  const host = clerkFrontendApi(config.clerkPublishableKey);
  await new Promise<void>((resolve, reject) => {
    const script = document.createElement("script");
    script.src = `https://${host}/npm/@clerk/clerk-js@5/dist/clerk.browser.js`;
    script.async = true;
    script.crossOrigin = "anonymous";
    script.dataset["clerkPublishableKey"] = config.clerkPublishableKey;
    script.onload = () => resolve();
    script.onerror = () => reject(new Error(`could not load Clerk from ${host}`));
    document.head.append(script);
  });
  const clerk = (window as unknown as { Clerk: ClerkGlobal }).Clerk;
  await clerk.load();
  if (!clerk.user) {
    const mount = h("div", { class: "signin" });
    root.replaceChildren(mount);
    clerk.mountSignIn(mount);
    await new Promise<void>((resolve) => clerk.addListener(({ user }) => user && resolve()));
  }
  const userId = clerk.user?.id ?? "";
  return {
    userId,
    token: async () => {
      const token = await clerk.session?.getToken();
      if (!token) throw new Error("no Clerk session");
      return token;
    },
    signOut: async () => {
      await clerk.signOut();
      location.reload();
    },
  };
}
