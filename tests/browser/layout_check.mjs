// Every shipped workflow loaded in the real frontend, in the classic canvas and in the Vue nodes mode ("Nodes 2.0",
// the setting Comfy.VueNodes.Enabled): each node's box as the user sees it, and every pair of nodes that overlap or
// sit closer than --min-gap. Reports what it saw as JSON (last stdout line); tests/integration/test_browser.py
// asserts on it.
//
//   node layout_check.mjs --url http://127.0.0.1:PORT --screenshots DIR [--substitute '{"ckpt_name": ...}'] \
//        [--min-gap 20] [--chromium PATH] WORKFLOW.json [WORKFLOW.json ...]
//
// A node's box, in graph units (what the workflow's "pos" and "size" are in), title bar included:
//   classic: node.boundingRect (the frontend's own box of the node: pos - title height, size + title height), read
//            after the loaders' previews arrived (a node may grow to fit what it draws);
//   Vue:     the node component's rectangle in the page ([data-node-id]), taken back to graph units through the
//            canvas transform (screen = (graph + offset) * scale). The components are measured with the whole graph
//            in view at scale 1 where it fits (a window of --width x --height), never below 0.6 (a far-out zoom may
//            draw nodes with less detail), once their sizes hold still.
// The mode is switched on for this page and put back as it was (settings are stored on the server).

import fs from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";

import { launchChromium, loadWorkflow, newReport, recordErrors, screenshotsIn, vueNodesMode } from "./chromium.mjs";

const { values: opts, positionals: workflowPaths } = parseArgs({
    allowPositionals: true,
    options: {
        url: { type: "string" },
        screenshots: { type: "string" },
        substitute: { type: "string", default: "{}" },
        "min-gap": { type: "string", default: "20" },
        width: { type: "string", default: "2560" },
        height: { type: "string", default: "1600" },
        chromium: { type: "string", default: process.env.CHROMIUM_PATH || "" },
        timeout: { type: "string", default: "120" },
    },
});
if (!opts.url || !opts.screenshots || workflowPaths.length === 0) {
    throw new Error("usage: node layout_check.mjs --url URL --screenshots DIR WORKFLOW.json [...]");
}
const TIMEOUT_MS = Number(opts.timeout) * 1000;
const MIN_GAP = Number(opts["min-gap"]);
const { report, step } = newReport();
report.min_gap = MIN_GAP;
report.modes = {};
const shot = screenshotsIn(opts.screenshots);
const browser = await launchChromium(opts.chromium);
let vue = null;  // the Vue nodes mode setting, put back as it was at the end
try {
    const page = await browser.newPage({ viewport: { width: Number(opts.width), height: Number(opts.height) },
        deviceScaleFactor: 1 });
    recordErrors(page, report);
    await page.goto(opts.url, { waitUntil: "domcontentloaded", timeout: TIMEOUT_MS });
    await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.KosmosGLoader
        && window.app.canvas && window.app.extensionManager?.setting, null, { timeout: TIMEOUT_MS });
    vue = await vueNodesMode(page);
    step("loaded", { frontend_version: await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null),
        vue_available: vue.available });
    await page.evaluate(async () => {  // nothing drawn over the canvas
        if (app.extensionManager.setting.get("Comfy.Minimap.Visible")) await app.extensionManager.setting.set("Comfy.Minimap.Visible", false);
    }).catch(() => {});

    // The graph's nodes fit into the window (graph units, title bars included; `boxes`: the last measurement, else the
    // frontend's own boxes), at scale 1 where they fit, never below 0.6. -> the scale.
    const fitView = (boxes) => page.evaluate(({ boxes }) => {
        const all = boxes ? Object.values(boxes).map((b) => b.box) : app.graph.nodes.map((n) => [...n.boundingRect]);
        const x0 = Math.min(...all.map((b) => b[0])), y0 = Math.min(...all.map((b) => b[1]));
        const x1 = Math.max(...all.map((b) => b[0] + b[2])), y1 = Math.max(...all.map((b) => b[1] + b[3]));
        const canvas = app.canvas.canvas;
        const margin = 120;  // the side bar covers the canvas at the left
        const scale = Math.max(0.6, Math.min(1, (canvas.clientWidth - 2 * margin) / (x1 - x0),
            (canvas.clientHeight - 2 * margin) / (y1 - y0)));
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [margin / scale - x0, margin / scale - y0];
        app.canvas.deselectAll?.();
        app.canvas.setDirty(true, true);
        return scale;
    }, { boxes });

    // Each node's box in graph units: { id: { type, title, box: [x, y, w, h] } } (+ the nodes the page shows no box for).
    const measure = (vue) => page.evaluate(({ vue }) => {
        const canvas = app.canvas.canvas.getBoundingClientRect();
        const { scale, offset } = app.canvas.ds;
        const boxes = {};
        const unmeasured = [];
        for (const node of app.graph.nodes) {
            let box = null;
            if (vue) {
                const element = document.querySelector(`[data-node-id="${node.id}"]`);
                const r = element?.getBoundingClientRect();
                if (r && r.width > 0 && r.height > 0) {
                    box = [(r.left - canvas.left) / scale - offset[0], (r.top - canvas.top) / scale - offset[1],
                        r.width / scale, r.height / scale];
                }
            } else {
                box = [...(node.boundingRect ?? node.getBounding())];
            }
            if (box) boxes[node.id] = { type: node.type, title: node.title, box: box.map((v) => Math.round(v * 10) / 10) };
            else unmeasured.push(node.id);
        }
        return { boxes, unmeasured };
    }, { vue });

    // The pairs of nodes closer than MIN_GAP: gap = the larger of the horizontal and vertical distances between the two
    // boxes (negative: they overlap by that much in both directions, the smaller overlap counted).
    const crowded = (boxes) => {
        const pairs = [];
        const entries = Object.entries(boxes);
        for (let i = 0; i < entries.length; i++) {
            for (let j = i + 1; j < entries.length; j++) {
                const [[ida, a], [idb, b]] = [entries[i], entries[j]];
                const [ax, ay, aw, ah] = a.box;
                const [bx, by, bw, bh] = b.box;
                const gapX = Math.max(bx - (ax + aw), ax - (bx + bw));
                const gapY = Math.max(by - (ay + ah), ay - (by + bh));
                const gap = Math.max(gapX, gapY);
                if (gap < MIN_GAP) {
                    pairs.push({ a: `${a.title} #${ida}`, b: `${b.title} #${idb}`, gap: Math.round(gap * 10) / 10,
                        overlap: gapX < 0 && gapY < 0 });
                }
            }
        }
        return pairs;
    };

    const checkMode = async (mode) => {
        const vue = mode === "vue";
        const results = {};
        for (const workflowPath of workflowPaths) {
            const name = path.basename(workflowPath, ".json");
            const workflow = JSON.parse(fs.readFileSync(workflowPath, "utf8"));
            await page.evaluate(() => app.graph.clear());
            const substituted = await loadWorkflow(page, workflow, JSON.parse(opts.substitute));
            // the loaders' previews arrive asynchronously (a node may grow to show one)
            await page.waitForFunction(() => app.graph.nodes.filter((n) => n.type === "LoadImage")
                .every((n) => n.imgs?.length && n.imgs.every((img) => img.complete && img.naturalWidth > 0)),
                null, { timeout: 20000 }).catch(() => { results[name] = { previews_missing: true }; });
            let scale = await fitView(null);
            // measure until two readings 300 ms apart agree (Vue components settle over a few frames), refitting the
            // view to what was measured
            let last = null;
            let reading = null;
            for (let attempt = 0; attempt < 20; attempt++) {
                await page.waitForTimeout(300);
                reading = await measure(vue);
                const key = JSON.stringify(reading);
                if (key === last) break;
                last = key;
                if (Object.keys(reading.boxes).length) scale = await fitView(reading.boxes);
            }
            await page.keyboard.press("Escape");
            await shot(page, `layout-${mode}-${name}`);
            results[name] = { ...results[name], substituted, scale: Math.round(scale * 1000) / 1000,
                nodes: await page.evaluate(() => app.graph.nodes.length),
                vue_node_elements: await page.evaluate(() => document.querySelectorAll("[data-node-id]").length),
                ...reading, crowded: crowded(reading.boxes) };
        }
        report.modes[mode] = results;
    };

    if (vue.before === true) await vue.set(false);  // the classic canvas first, whatever the server's settings say
    await checkMode("classic");
    step("classic");
    if (vue.available) {
        await vue.set(true);
        await checkMode("vue");
        step("vue", { vue_mode: await vue.read() });
        step("restored", { restored: await vue.restore() });
    }
} finally {
    await vue?.restore().catch(() => {});
    await browser.close();
}
console.log(JSON.stringify(report));
