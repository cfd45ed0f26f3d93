// What the browser scripts here share: Debian's Chromium (installed by install.sh) run headless, the JSON
// report the pytest wrappers read from the last stdout line, and the graph several checks start from.

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

/** Console errors and uncaught page errors of `page` (with their stack: where it was thrown), into the report. */
export function recordErrors(page, report) {
    page.on("console", (msg) => { if (msg.type() === "error") report.console_errors.push(msg.text()); });
    page.on("pageerror", (err) => report.page_errors.push(err.stack || String(err)));
}

/** shot(page, name, clip?): a screenshot NAME.png in `folder` (made if missing). */
export function screenshotsIn(folder) {
    fs.mkdirSync(folder, { recursive: true });
    return (page, name, clip) => page.screenshot({ path: path.join(folder, `${name}.png`), clip });
}

/** A prompt node fed by two LoadImage nodes, on the cleared graph's canvas at scale 1: the loaders connected to
 * image0 and image1, each once the Autogrow input has made its socket. The nodes are kept in the page as
 * window[name] = { prompt, first, second }; `positions` = { prompt, first, second } ([x, y] each); `secondImage`:
 * a file of ComfyUI's input folder for the second loader, where it is listed. -> their node ids. */
export async function promptWithTwoLoaders(page, name, positions, secondImage = null) {
    const ids = await page.evaluate(({ name, positions, secondImage }) => {
        const add = (type, pos) => {
            const node = LiteGraph.createNode(type);
            node.pos = pos;
            app.graph.add(node);
            return node;
        };
        const first = add("LoadImage", positions.first);
        const second = add("LoadImage", positions.second);
        const prompt = add("KosmosGInterleavedPrompt", positions.prompt);
        const file = second.widgets.find((w) => w.name === "image");
        if (secondImage && file?.options?.values?.includes(secondImage)) {
            file.value = secondImage;
            file.callback?.(file.value);
        }
        window[name] = { prompt, first, second };
        app.canvas.ds.offset = [0, 0];
        app.canvas.ds.scale = 1;
        app.canvas.setDirty(true, true);
        return { prompt: prompt.id, first: first.id, second: second.id };
    }, { name, positions, secondImage });
    for (const [from, socket] of [["first", "images.image0"], ["second", "images.image1"]]) {
        await page.waitForFunction(({ name, socket }) => window[name].prompt.inputs.some((i) => i.name === socket),
            { name, socket }, { timeout: 15000 });
        await page.evaluate(({ name, from, socket }) => {
            const { prompt } = window[name];
            window[name][from].connect(0, prompt, prompt.inputs.findIndex((i) => i.name === socket));
        }, { name, from, socket });
    }
    return ids;
}

/** app.loadGraphData(workflow) (a parsed UI-format workflow), after writing `substitutions` ({widget name: value},
 * e.g. the test server's model files) into its nodes' widgets_values, which follow each node's widget order: done
 * in the JSON before loading, so the frontend's missing-model check sees the files the server really has.
 * -> the substituted widgets, "NodeType.widget" each. */
export async function loadWorkflow(page, workflow, substitutions = {}) {
    return page.evaluate(async ({ workflow, substitutions }) => {
        const changed = [];
        for (const node of workflow.nodes) {
            const probe = LiteGraph.createNode(node.type);
            const names = probe?.widgets?.map((w) => w.name) ?? [];
            names.forEach((name, k) => {
                if (name in substitutions && Array.isArray(node.widgets_values) && k < node.widgets_values.length) {
                    node.widgets_values[k] = substitutions[name];
                    changed.push(`${node.type}.${name}`);
                }
            });
        }
        await app.loadGraphData(workflow);
        return changed;
    }, { workflow, substitutions });
}

const VUE_NODES_SETTING = "Comfy.VueNodes.Enabled";

/** The frontend's Vue nodes mode ("Nodes 2.0"), a setting the server stores for every page: `available` (an unknown
 * setting reads as undefined, a known one as its boolean), `before` (its value now), `set(on)`, and `restore()`
 * -> whether it is back as it was, so the other browser checks find the mode they expect. */
export async function vueNodesMode(page) {
    const read = () => page.evaluate((id) => app.extensionManager.setting.get(id), VUE_NODES_SETTING);
    const write = (on) => page.evaluate(async ([id, on]) => app.extensionManager.setting.set(id, on), [VUE_NODES_SETTING, on]);
    const before = await read();
    let changed = false;
    return {
        available: typeof before === "boolean",
        before,
        read,
        set: async (on) => {
            changed = true;
            await write(on);
        },
        restore: async () => {
            if (changed) await write(before);
            changed = false;
            return (await read()) === before;
        },
    };
}
