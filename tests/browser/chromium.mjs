// What the browser scripts here share: Debian's Chromium (installed by install.sh) run headless, and the JSON
// report the pytest wrappers read from the last stdout line.

import { chromium } from "playwright-core";
import fs from "node:fs";
import path from "node:path";

// no sandbox (root in CI containers), no GPU, and nothing that phones home on the closed network
const CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"];

/** Headless Chromium: `explicit` (a script's --chromium, default $CHROMIUM_PATH) or Debian's. */
export async function launchChromium(explicit) {
    const candidates = [explicit, "/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .filter(Boolean);
    const executablePath = candidates.find((p) => fs.existsSync(p));
    if (!executablePath) throw new Error(`no Chromium found (tried ${candidates.join(", ")}); run tests/browser/install.sh`);
    return chromium.launch({ executablePath, args: CHROMIUM_ARGS, headless: true });
}

/** { report, step }: the report (steps done, console and page errors) and step(name, data), which records a step
 * and merges what it saw into the report. */
export function newReport() {
    const report = { steps: [], console_errors: [], page_errors: [] };
    const step = (name, data = {}) => { report.steps.push(name); Object.assign(report, data); };
    return { report, step };
}

/** Console errors and uncaught page errors of `page`, into the report. */
export function recordErrors(page, report) {
    page.on("console", (msg) => { if (msg.type() === "error") report.console_errors.push(msg.text()); });
    page.on("pageerror", (err) => report.page_errors.push(String(err)));
}

/** shot(page, name, clip?): a screenshot NAME.png in `folder` (made if missing). */
export function screenshotsIn(folder) {
    fs.mkdirSync(folder, { recursive: true });
    return (page, name, clip) => page.screenshot({ path: path.join(folder, `${name}.png`), clip });
}
