// Builds the web chat app into gen/web, which `threadline serve` serves on its HTTP port.
// The build is deterministic (content-hashed names, no timestamps), so `.ci/gen` can check that
// the committed gen/web matches these sources.
import { fileURLToPath } from "node:url";
import { defineConfig } from "vite";

const here = fileURLToPath(new URL(".", import.meta.url));

export default defineConfig({
  root: here,
  base: "/",
  logLevel: "warn",
  build: {
    // .ci/gen points THREADLINE_WEB_OUT elsewhere to check freshness without touching gen/web.
    outDir: process.env["THREADLINE_WEB_OUT"] ?? fileURLToPath(new URL("../../../gen/web", import.meta.url)),
    emptyOutDir: true,
    target: "es2022",
    sourcemap: false,
    reportCompressedSize: false,
    // One small app: a single chunk keeps the page to three requests.
    modulePreload: { polyfill: false },
  },
  server: {
    // `npm run dev:web` against a local `threadline serve` (its HTTP port is 8080 by default).
    proxy: { "/app-config.json": "http://127.0.0.1:8080", "/auth": "http://127.0.0.1:8080", "/blobs": "http://127.0.0.1:8080" },
  },
});
