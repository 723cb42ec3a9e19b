// Two users chat in real Chromium (Debian's, driven by playwright-core) through the web app,
// the grpc-web edge and the real server. Run by tests/e2e/test_browser_chat.py, which owns the
// server: this script prints `CONTROL <action>` (restart-edge, restart-server) and waits for
// `OK` on stdin. Any console error, page error or failed request outside an announced outage
// fails the run. Screenshots of the main states go to $SCREENSHOT_DIR.
import { createInterface } from "node:readline";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { chromium, type Browser, type BrowserContext, type Page } from "playwright-core";

const APP_URL = process.env["APP_URL"] ?? "";
const SHOTS = process.env["SCREENSHOT_DIR"] ?? "";
const WORK = process.env["WORK_DIR"] ?? "/tmp";
// Generous: the test never races the clock; these only bound a hung run.
const WAIT = { timeout: 60_000 };

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function control(action: string): Promise<void> {
  process.stdout.write(`CONTROL ${action}\n`);
  const answer = await lines.next();
  if (answer.done || answer.value.trim() !== "OK") throw new Error(`control ${action}: ${String(answer.value)}`);
}

const problems: string[] = [];
let outage = false; // while the harness restarts the edge or the server, failed requests are expected

function watch(page: Page, who: string): void {
  page.on("pageerror", (error) => problems.push(`${who}: page error: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() !== "error") return;
    const text = message.text();
    if (outage && /Failed to load resource|ERR_CONNECTION|net::/.test(text)) return;
    problems.push(`${who}: console error: ${text}`);
  });
  page.on("requestfailed", (request) => {
    const failure = request.failure()?.errorText ?? "";
    // A stream the app closes itself (thread switch, sign-out, reconnect) is aborted on purpose.
    if (failure.includes("ERR_ABORTED")) return;
    if (outage) return;
    problems.push(`${who}: request failed: ${request.method()} ${request.url()} ${failure}`);
  });
  page.on("response", (response) => {
    if (response.status() >= 400 && !outage) problems.push(`${who}: HTTP ${response.status()} ${response.url()}`);
  });
}

async function shot(page: Page, name: string): Promise<void> {
  if (SHOTS) await page.screenshot({ path: join(SHOTS, `${name}.png`) });
}

async function signIn(context: BrowserContext, user: string): Promise<Page> {
  const page = await context.newPage();
  watch(page, user);
  await page.goto(APP_URL);
  await page.getByLabel("User name").fill(user);
  if (user === "alice") await shot(page, "01-sign-in");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#me").waitFor(WAIT);
  await online(page);
  return page;
}

async function online(page: Page): Promise<void> {
  await page.locator('#banner[data-state="online"]').waitFor({ state: "attached", ...WAIT });
}

async function openThread(page: Page, title: string): Promise<void> {
  await page.locator(".thread-item", { hasText: title }).click();
  await page.locator("#thread-title", { hasText: title }).waitFor(WAIT);
}

async function send(page: Page, text: string): Promise<void> {
  await page.locator("#composer-text").fill(text);
  await page.locator("#composer-text").press("Enter");
}

/** Waits until `text` shows exactly once as a confirmed message (never duplicated). */
function exactly(text: string): RegExp {
  return new RegExp(`^${text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}$`);
}

async function seeOnce(page: Page, text: string): Promise<void> {
  const rows = page.locator(".message .text", { hasText: exactly(text) });
  await rows.first().waitFor(WAIT);
  await page.locator(`.message[data-status="sent"] .text`, { hasText: exactly(text) }).first().waitFor(WAIT);
  const count = await rows.count();
  if (count !== 1) throw new Error(`"${text}" shows ${count} times`);
}

async function main(): Promise<void> {
  const browser: Browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
  });
  try {
    const aliceContext = await browser.newContext({ acceptDownloads: true, viewport: { width: 1100, height: 700 } });
    const bobContext = await browser.newContext({ acceptDownloads: true, viewport: { width: 1100, height: 700 } });
    const alice = await signIn(aliceContext, "alice");
    const bob = await signIn(bobContext, "bob");

    // Alice starts a thread with Bob and writes; Bob sees it with an unread badge.
    await alice.getByRole("button", { name: "New thread" }).click();
    await alice.getByLabel("Title").fill("Lunch");
    await alice.getByLabel(/Participants/).fill("bob");
    await alice.getByRole("button", { name: "Create" }).click();
    await alice.locator("#thread-title", { hasText: "Lunch" }).waitFor(WAIT);
    await send(alice, "noon?");
    await seeOnce(alice, "noon?");
    await bob.locator('.thread-item:has-text("Lunch") [data-testid="unread"]', { hasText: "1" }).waitFor(WAIT);
    await shot(bob, "02-unread-badge");

    // Bob opens it (the badge clears, the read marker moves), Alice sees him online and typing.
    await openThread(bob, "Lunch");
    await seeOnce(bob, "noon?");
    await bob.locator('.thread-item:has-text("Lunch") [data-testid="unread"]').waitFor({ state: "detached", ...WAIT });
    await openThread(alice, "Lunch");
    await alice.locator('.participants li[data-user="bob"][data-online="true"]').waitFor(WAIT);
    await bob.locator("#composer-text").pressSequentially("sure, wh", { delay: 20 });
    await alice.locator("#typing", { hasText: "bob is typing" }).waitFor(WAIT);
    await shot(alice, "03-typing");
    await bob.locator("#composer-text").fill("sure, where?");
    await bob.locator("#composer-text").press("Enter");
    await seeOnce(alice, "sure, where?");
    await alice.locator("#typing", { hasText: "bob is typing" }).waitFor({ state: "detached", ...WAIT }).catch(async () => {
      await alice.locator("#typing:empty").waitFor(WAIT);
    });

    // An attachment: Alice uploads a file, Bob downloads the same bytes.
    const upload = join(WORK, "menu.txt");
    await writeFile(upload, "soup of the day: tomato\n");
    await alice.locator("#composer-file").setInputFiles(upload);
    await send(alice, "menu attached");
    await seeOnce(bob, "menu attached");
    const downloadPromise = bob.waitForEvent("download", WAIT);
    await bob.locator(".attachment", { hasText: "menu.txt" }).click();
    const download = await downloadPromise;
    const saved = join(WORK, "downloaded-menu.txt");
    await download.saveAs(saved);
    if ((await readFile(saved, "utf8")) !== "soup of the day: tomato\n") throw new Error("downloaded bytes differ");
    await shot(bob, "04-chat");

    // The edge restarts mid-conversation: both pages reconnect and resume; nothing lost or doubled.
    outage = true;
    await control("restart-edge");
    await send(alice, "after the edge restart");
    await online(alice);
    await online(bob);
    outage = false;
    await seeOnce(alice, "after the edge restart");
    await seeOnce(bob, "after the edge restart");

    // The server restarts: Bob's message written during the outage is queued and delivered once.
    outage = true;
    await control("stop-server");
    await bob.locator('#banner[data-state="reconnecting"]').waitFor(WAIT);
    await shot(bob, "05-reconnecting");
    await send(bob, "written while the server was down");
    await bob.locator('.message[data-status="pending"] .text', { hasText: "written while the server was down" }).waitFor(WAIT);
    await control("start-server");
    await online(alice);
    await online(bob);
    outage = false;
    await seeOnce(alice, "written while the server was down");
    await seeOnce(bob, "written while the server was down");
    for (const text of ["noon?", "sure, where?", "menu attached", "after the edge restart"]) {
      await seeOnce(alice, text);
      await seeOnce(bob, text);
    }

    // A conflicting edit: Alice's edit of "noon?" is held on its way (as on a slow network)
    // while her second device saves another text; when it lands, the server cannot merge the
    // two and the dialog asks which to keep.
    const otherContext = await browser.newContext({ viewport: { width: 1100, height: 700 } });
    const aliceElsewhere = await signIn(otherContext, "alice");
    await openThread(aliceElsewhere, "Lunch");
    await seeOnce(aliceElsewhere, "noon?");
    let release: () => void = () => undefined;
    const released = new Promise<void>((resolve) => (release = resolve));
    await alice.route("**/threadline.v1.RealtimeService/Submit", async (route) => {
      await released;
      await route.continue();
    });
    await alice.locator(".message.mine", { hasText: "noon?" }).locator(".edit").click();
    await alice.locator("#composer-text").fill("noon at the noodle bar?");
    await alice.locator("#composer-text").press("Enter");
    await alice.locator('.message[data-status="pending"] .text', { hasText: "noon at the noodle bar?" }).waitFor(WAIT);
    await aliceElsewhere.locator(".message.mine", { hasText: "noon?" }).locator(".edit").click();
    await aliceElsewhere.locator("#composer-text").fill("noon at the pizza place?");
    await aliceElsewhere.locator("#composer-text").press("Enter");
    await seeOnce(aliceElsewhere, "noon at the pizza place?");
    release(); // (the route stays: later Submits pass straight through it)
    const dialog = alice.locator("#conflict-dialog[open]");
    await dialog.waitFor(WAIT);
    await dialog.getByTestId("conflict-theirs").filter({ hasText: "noon at the pizza place?" }).waitFor(WAIT);
    await dialog.getByTestId("conflict-mine").filter({ hasText: "noon at the noodle bar?" }).waitFor(WAIT);
    await shot(alice, "06-conflict");
    await dialog.getByRole("button", { name: "Keep mine" }).click();
    await seeOnce(alice, "noon at the noodle bar?");
    await seeOnce(bob, "noon at the noodle bar?");
    await seeOnce(aliceElsewhere, "noon at the noodle bar?");

    // Delete: Bob's own message goes, for everyone.
    bob.once("dialog", (d) => void d.accept());
    await bob.locator(".message.mine", { hasText: "sure, where?" }).locator(".delete").click();
    await alice.locator(".message.deleted .text", { hasText: "This message was deleted." }).first().waitFor(WAIT);
    await shot(alice, "07-after-all");
    if (problems.length) throw new Error(problems.join("\n"));
    process.stdout.write("PASS\n");
  } catch (error) {
    for (const [i, context] of browser.contexts().entries()) {
      for (const [j, page] of context.pages().entries()) await shot(page, `failure-${i}-${j}`).catch(() => undefined);
    }
    throw error;
  } finally {
    await browser.close();
  }
}

main().then(
  () => process.exit(0),
  (error: unknown) => {
    process.stderr.write(`${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
    if (problems.length) process.stderr.write(`problems:\n${problems.join("\n")}\n`);
    process.exit(1);
  },
);
