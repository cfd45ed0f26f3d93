// Screenshots of the shipped workflows, as a user sees them in the real ComfyUI frontend.
//
//   node workflow_screenshots.mjs --url http://127.0.0.1:PORT --out DIR \
//        [--width 1400] [--height 800] [--chromium PATH] WORKFLOW.json [WORKFLOW.json ...]
//
// Writes DIR/workflow-<name>.png per workflow (<name> = the file name without "kosmosg-" and ".json")
// and prints one JSON line: per workflow the node count, the canvas scale used and any page errors.
// The server is started and stopped by scripts/make_workflow_screenshots.py, which also places
// empty files named like the workflows' models so the combos show those names without warnings.
//
// Per workflow: app.loadGraphData(json) -> focus mode (no menus or side bars) -> dismiss dialogs and
// toasts -> fit the graph's bounding box into the window ourselves (FitView leaves a wide margin)
// -> screenshot of the whole window.

import fs from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";

import { launchChromium } from "./chromium.mjs";

const { values: opts, positionals: workflowPaths } = parseArgs({
    allowPositionals: true,
    options: {
        url: { type: "string" },
        out: { type: "string" },
        width: { type: "string", default: "1400" },
        height: { type: "string", default: "800" },
        margin: { type: "string", default: "24" },
        "max-scale": { type: "string", default: "1.0" },
        chromium: { type: "string", default: process.env.CHROMIUM_PATH || "" },
        timeout: { type: "string", default: "120" },
    },
});
if (!opts.url || !opts.out || workflowPaths.length === 0) {
    throw new Error("usage: node workflow_screenshots.mjs --url URL --out DIR WORKFLOW.json [...]");
}
const TIMEOUT_MS = Number(opts.timeout) * 1000;
const VIEWPORT = { width: Number(opts.width), height: Number(opts.height) };

const screenshotName = (workflowPath) =>
    `workflow-${path.basename(workflowPath, ".json").replace(/^kosmosg-/, "")}.png`;

// Close whatever the frontend layered over the canvas: dialogs (Escape / their close button) and
// toasts (their close buttons). Nothing is expected here; this only keeps the pictures clean.
async function dismissOverlays(page) {
    for (let i = 0; i < 3; i++) {
        const dialogs = page.locator(".p-dialog:visible");
        if ((await dialogs.count()) === 0) break;
        await page.keyboard.press("Escape");
        await page.waitForTimeout(200);
        const close = page.locator(".p-dialog:visible .p-dialog-close-button, .p-dialog:visible button[aria-label='Close']");
        if (await close.count()) await close.first().click().catch(() => {});
    }
    const toastClose = page.locator(".p-toast .p-toast-close-button");
    for (let i = await toastClose.count(); i > 0; i--) await toastClose.first().click().catch(() => {});
    await page.evaluate(() => app.extensionManager?.toast?.removeAll?.()).catch(() => {});
}

fs.mkdirSync(opts.out, { recursive: true });
const report = { viewport: VIEWPORT, workflows: [] };
const browser = await launchChromium(opts.chromium);
try {
    const page = await browser.newPage({ viewport: VIEWPORT, deviceScaleFactor: 1 });
    const pageErrors = [];
    page.on("pageerror", (err) => pageErrors.push(String(err)));
    await page.goto(opts.url, { waitUntil: "domcontentloaded", timeout: TIMEOUT_MS });
    await page.waitForFunction(() => window.app?.graph && window.app.canvas
        && window.LiteGraph?.registered_node_types?.KosmosGLoader, null, { timeout: TIMEOUT_MS });
    await page.evaluate(async () => {
        const setting = app.extensionManager?.setting;
        // a clean canvas: no minimap, render statistics or zoom toolbar; no missing-model dialog
        // (the placeholder model files make that moot anyway)
        for (const [id, value] of [["Comfy.Minimap.Visible", false], ["Comfy.Graph.CanvasInfo", false],
            ["Comfy.Graph.CanvasMenu", false], ["Comfy.Workflow.ShowMissingModelsWarning", false],
            ["Comfy.Workflow.ShowMissingNodesWarning", false]]) {
            try { await setting?.set?.(id, value); } catch (e) { /* unknown in this frontend version */ }
        }
        await app.extensionManager?.command?.execute?.("Workspace.ToggleFocusMode");
    });
    await page.waitForTimeout(500);
    await dismissOverlays(page);
    // focus mode leaves one "show the menus" button in the top-right corner: hide it for the pictures
    report.hid_focus_mode_button = await page.evaluate(() => {
        const button = document.querySelector(".pi-bars")?.closest(".fixed");
        if (button) button.style.visibility = "hidden";
        return Boolean(button);
    });

    for (const workflowPath of workflowPaths) {
        const workflow = JSON.parse(fs.readFileSync(workflowPath, "utf8"));
        const errorsBefore = pageErrors.length;
        await page.evaluate(async ({ workflow, name }) => {
            await app.loadGraphData(workflow, true, true, name);
        }, { workflow, name: path.basename(workflowPath, ".json") });
        // LoadImage previews arrive asynchronously; the prompt node's status line too
        await page.waitForFunction(() => app.graph.nodes.filter((n) => n.type === "LoadImage")
            .every((n) => n.imgs?.length && n.imgs.every((img) => img.complete && img.naturalWidth > 0)),
            null, { timeout: 20000 }).catch(() => {});
        await page.waitForTimeout(400);
        await dismissOverlays(page);
        const view = await page.evaluate(({ margin, maxScale }) => {
            // bounding box of nodes + groups in graph units, title bars included
            let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
            const grow = (x, y, w, h) => {
                x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
            };
            for (const node of app.graph.nodes) {
                const b = node.boundingRect ?? node.getBounding?.();
                if (b) grow(b[0], b[1], b[2], b[3]);
                else grow(node.pos[0], node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, node.size[0], node.size[1] + LiteGraph.NODE_TITLE_HEIGHT);
            }
            for (const group of app.graph.groups ?? app.graph._groups ?? []) {
                const b = group._bounding ?? group.boundingRect;
                if (b) grow(b[0], b[1], b[2], b[3]);
            }
            const canvas = app.canvas.canvas;
            const [cw, ch] = [canvas.clientWidth, canvas.clientHeight];
            const scale = Math.min(maxScale, (cw - 2 * margin) / (x1 - x0), (ch - 2 * margin) / (y1 - y0));
            const ds = app.canvas.ds;
            ds.scale = scale;
            // centre the box: screen = (graph + offset) * scale
            ds.offset = [(cw / scale - (x1 - x0)) / 2 - x0, (ch / scale - (y1 - y0)) / 2 - y0];
            app.canvas.deselectAll?.();
            app.canvas.setDirty(true, true);
            return { nodes: app.graph.nodes.length, scale: Number(scale.toFixed(3)), canvas: [cw, ch],
                bounds: [x0, y0, x1, y1].map(Math.round) };
        }, { margin: Number(opts.margin), maxScale: Number(opts["max-scale"]) });
        await page.waitForTimeout(600);  // DOM widgets (text areas) follow the canvas transform on the next frames
        await dismissOverlays(page);
        const file = path.join(opts.out, screenshotName(workflowPath));
        await page.screenshot({ path: file });
        report.workflows.push({ workflow: path.basename(workflowPath), screenshot: file, ...view,
            page_errors: pageErrors.slice(errorsBefore) });
    }
} finally {
    await browser.close();
}
console.log(JSON.stringify(report));
