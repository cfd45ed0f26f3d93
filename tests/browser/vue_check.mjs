// The prompt node in the frontend's Vue node rendering mode ("Nodes 2.0", the setting Comfy.VueNodes.Enabled):
// there the nodes are Vue components in the DOM, not drawn on the canvas, and a DOM widget's element is mounted
// inside the node's component. Reports what it saw as JSON (last stdout line).
//
//   node vue_check.mjs --url http://127.0.0.1:PORT --screenshots DIR --workflow ../../workflows/X.json \
//        [--substitute '{"ckpt_name": "tiny.safetensors", ...}'] [--chromium PATH]
//
// Steps: page load -> enable Vue nodes through the settings API (report `available: false` and stop when the
// served frontend has no such setting) -> a prompt node and two LoadImage nodes, connected -> type a text with
// two <i> into the node's textarea, as a user -> read the status line from the DOM (present, visible, text) ->
// bypass the second loader with Ctrl+B -> read it again -> copy the prompt node (Ctrl+C) and paste it with its
// links (Ctrl+Shift+V) and alone (Ctrl+V) -> a fresh graph: an active Upscale Image between the second loader and
// image1, the loader muted with Ctrl+M -> load a shipped workflow. At each moment a prompt node is read as its
// component shows it (status line, socket names, socket dot colours) and as app.graphToPrompt() would send it.
// Screenshots of the interesting moments.

import fs from "node:fs";
import { parseArgs } from "node:util";

import {
    launchChromium, loadWorkflow, newReport, promptWithTwoLoaders, recordErrors, screenshotsIn, vueNodesMode,
} from "./chromium.mjs";

const { values: opts } = parseArgs({
    options: {
        url: { type: "string" },
        screenshots: { type: "string" },
        workflow: { type: "string" },
        substitute: { type: "string", default: "{}" },
        chromium: { type: "string", default: process.env.CHROMIUM_PATH || "" },
        timeout: { type: "string", default: "120" },
    },
});
const TIMEOUT_MS = Number(opts.timeout) * 1000;
const { report, step } = newReport();
const shot = screenshotsIn(opts.screenshots);
const browser = await launchChromium(opts.chromium);
let vue = null;  // settings are stored on the server: leave the mode as it was for the other browser checks
try {
    const page = await browser.newPage({ viewport: { width: 1600, height: 900 }, deviceScaleFactor: 1 });
    recordErrors(page, report);

    await page.goto(opts.url, { waitUntil: "domcontentloaded", timeout: TIMEOUT_MS });
    await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.KosmosGInterleavedPrompt
        && window.app.canvas && window.app.extensionManager?.setting, null, { timeout: TIMEOUT_MS });
    step("loaded", await page.evaluate(() => ({
        frontend_version: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
        extension_registered: app.extensions.some((e) => e.name === "KosmosG.interleavedPrompt"),
    })));

    // --- enable Vue nodes: an unknown setting reads as undefined (a known one has its boolean default) -------
    vue = await vueNodesMode(page);
    report.available = vue.available;
    if (!report.available) {
        step("no_vue_nodes", { setting_value: vue.before ?? null });
    } else {
        await page.evaluate(async () => {
            if (app.extensionManager.setting.get("Comfy.Minimap.Visible")) await app.extensionManager.setting.set("Comfy.Minimap.Visible", false);
        }).catch((e) => { report.setting_error = String(e); });
        await vue.set(true).catch((e) => { report.setting_error = String(e); });
        await page.evaluate(() => app.graph.clear());
        await page.keyboard.press("Escape");
        const ids = await promptWithTwoLoaders(page, "__vk", { prompt: [520, 120], first: [60, 90], second: [60, 470] },
            "kosmosg_subject_2.png");
        // the node is a Vue component now: its root carries data-node-id
        const nodeSelector = (id) => `[data-node-id="${id}"]`;
        await page.locator(nodeSelector(ids.prompt)).first().waitFor({ timeout: 30000 })
            .catch((e) => { report.node_dom_error = String(e); });

        // The prompt node window[group][key] as its component shows it and as queueing would send it. The other nodes
        // of window[group] name the nodes in the report ("second", "scale"); one not named there reads as its type.
        const state = async (group, key = "prompt") => {
            await page.waitForTimeout(400);
            await page.waitForFunction(({ group, key }) => !window[group][key].kosmosgRefreshPending, { group, key },
                { timeout: 15000 });
            return page.evaluate(async ({ group, key }) => {
                const nodes = window[group];
                const node = nodes[key];
                const nameOf = (id) => Object.entries(nodes).find(([, n]) => String(n.id) === String(id))?.[0]
                    ?? app.graph.getNodeById(id)?.type ?? String(id);
                const component = document.querySelector(`[data-node-id="${node.id}"]`);
                const element = component?.querySelector("[data-testid='kosmosg-status-summary']");
                const box = element?.getBoundingClientRect();
                const style = element ? getComputedStyle(element) : null;
                const hit = box && box.width > 0 ? document.elementFromPoint(box.x + Math.min(5, box.width / 2), box.y + box.height / 2) : null;
                const { output } = await app.graphToPrompt();
                const sentLinks = (n) => Object.entries(output[String(n.id)]?.inputs ?? {}).filter(([, v]) => Array.isArray(v));
                return {
                    vue_mode: app.extensionManager.setting.get("Comfy.VueNodes.Enabled"),
                    vue_node_elements: document.querySelectorAll("[data-node-id]").length,
                    graph_nodes: app.graph.nodes.length,
                    // status lines: in this node's component, and in the page for all prompt nodes of the graph
                    summary_count: component?.querySelectorAll("[data-testid='kosmosg-status-summary']").length ?? 0,
                    summary_total: document.querySelectorAll("[data-testid='kosmosg-status-summary']").length,
                    prompt_nodes: app.graph.nodes.filter((n) => n.type === "KosmosGInterleavedPrompt").length,
                    summary_in_node: !!element,
                    summary_connected: !!element?.isConnected,
                    summary_text: element?.textContent ?? null,
                    summary_box: box ? [box.x, box.y, box.width, box.height].map(Math.round) : null,
                    summary_visible: !!(box && box.width > 0 && box.height > 0 && style.visibility !== "hidden"
                        && style.display !== "none" && Number(style.opacity) > 0 && element.checkVisibility?.() !== false),
                    summary_on_top: !!(hit && (hit === element || element.contains(hit) || hit.closest?.("[data-testid='kosmosg-status']"))),
                    preview_text: component?.querySelector("[data-testid='kosmosg-status-preview']")?.textContent ?? null,
                    status: node.kosmosgStatus ?? null,
                    text_value: node.widgets.find((w) => w.name === "text")?.value ?? null,
                    labels: node.inputs.filter((i) => i.name.startsWith("images.")).map((i) => i.label ?? null),
                    // what the node's component shows: its socket names are text in the page, not on the canvas
                    node_text: component?.innerText ?? null,
                    // each image socket on the node (label, link, colour the extension set) and in its component: the
                    // slot rows in page order, each row's text, and the colour its dot is painted with (an optional
                    // socket's hollow dot is an SVG circle, a plain one a div)
                    sockets: node.inputs.map((input, slot) => ({ input, slot }))
                        .filter(({ input }) => input.name.startsWith("images.")).map(({ input, slot }) => {
                            const link = node.getInputLink(slot);
                            const dot = component?.querySelector(`[data-slot-key="${node.id}-in-${slot}"]`);
                            const circle = dot?.querySelector("circle");
                            return { name: input.name, label: input.label ?? null, linked: node.isInputConnected(slot),
                                from: link ? nameOf(link.origin_id) : null, color_on: input.color_on ?? null,
                                shown: dot?.closest(".lg-slot")?.innerText.trim() ?? null,
                                dot: circle ? getComputedStyle(circle).fill : dot ? getComputedStyle(dot).backgroundColor : null };
                        }),
                    dom_slot_order: [...(component?.querySelectorAll(".lg-slot--input [data-slot-key]") ?? [])]
                        .map((dot) => node.inputs[Number(dot.dataset.slotKey.split("-").at(-1))]?.name ?? null)
                        .filter((name) => name?.startsWith("images.")),
                    modes: Object.fromEntries(Object.entries(nodes).map(([name, n]) => [name, n.mode])),
                    // what queueing would send: socket -> the node it links (named), and each named node's linked inputs
                    api_images: Object.fromEntries(sentLinks(node).filter(([k]) => k.startsWith("images."))
                        .map(([k, v]) => [k, nameOf(v[0])])),
                    api_links: Object.fromEntries(Object.entries(nodes).filter(([, n]) => output[String(n.id)])
                        .map(([name, n]) => [name, sentLinks(n).map(([k]) => k)])),
                };
            }, { group, key });
        };
        // select window[group][key] alone, as a user does: a click on its component's title bar (the canvas API makes the
        // same selection first, so the shortcut that follows acts on that node even if the click lands on a control)
        const selectAlone = async (group, key) => {
            const id = await page.evaluate(({ group, key }) => {
                app.canvas.deselectAll();
                app.canvas.selectItems([window[group][key]]);
                return window[group][key].id;
            }, { group, key });
            await page.locator(nodeSelector(id)).first().click({ position: { x: 60, y: 12 }, timeout: 15000 })
                .catch((e) => { report.select_error = String(e); });
        };

        const connected = await state("__vk");
        // type like a user into the prompt node's textarea (inside its Vue component)
        const textarea = page.locator(`${nodeSelector(ids.prompt)} textarea`).first();
        let typeError = null;
        try {
            await textarea.click({ timeout: 15000 });
            await textarea.press("Control+a");
            await textarea.pressSequentially("a photo of <i> next to <i>", { delay: 5 });
        } catch (e) {
            typeError = String(e);
        }
        const typed = await state("__vk");
        await shot(page, "vue-prompt-node");
        // bypass the second loader: select it alone, Ctrl+B on the canvas
        await selectAlone("__vk", "second");
        await page.keyboard.press("Control+b");
        const bypassed = await state("__vk");
        await shot(page, "vue-prompt-node-bypassed-loader");
        await page.keyboard.press("Control+b");
        const unbypassed = await state("__vk");
        step("vue", { vue: { ids, connected, typed, type_error: typeError, bypassed, unbypassed } });

        // --- copy + paste the prompt node with the keyboard: with its links (Ctrl+Shift+V) and alone (Ctrl+V) --------
        // the paste lands at the pointer: an empty spot of the canvas, right of the original (graph = screen offset
        // there: scale 1, offset 0). The copy is kept as window.__vk[name].
        const canvasBox = await page.locator("#graph-canvas").boundingBox();
        const paste = async (keys, name, at) => {
            await selectAlone("__vk", "prompt");
            const before = await page.evaluate(() => app.graph.nodes.map((n) => n.id));
            await page.keyboard.press("Control+c");
            await page.mouse.move(canvasBox.x + at[0], canvasBox.y + at[1]);
            await page.keyboard.press(keys);
            await page.waitForFunction((before) => app.graph.nodes.some((n) => n.type === "KosmosGInterleavedPrompt"
                && !before.includes(n.id)), before, { timeout: 15000 });
            await page.evaluate(({ before, name }) => {
                window.__vk[name] = app.graph.nodes.find((n) => n.type === "KosmosGInterleavedPrompt" && !before.includes(n.id));
            }, { before, name });
            return state("__vk", name);
        };
        const pasteConnected = await paste("Control+Shift+v", "copy_connected", [1000, 130]);
        const pasteAlone = await paste("Control+v", "copy_alone", [1000, 520]);
        const original = await state("__vk");
        const deselect = () => page.mouse.click(canvasBox.x + 1300, canvasBox.y + 850);  // no selection toolbox in the picture
        await deselect();
        await shot(page, "vue-prompt-node-pasted");
        step("copy_paste", { copy_paste: { connected: pasteConnected, alone: pasteAlone, original } });

        // --- an active Upscale Image fed by a muted Load Image: graphToPrompt sends it without its image and the
        // server refuses the prompt; the status line names it. A fresh graph, the loader muted with Ctrl+M --------
        await page.evaluate(() => app.graph.clear());
        await promptWithTwoLoaders(page, "__refused", { prompt: [760, 120], first: [60, 90], second: [60, 470] },
            "kosmosg_subject_2.png");
        await page.evaluate(() => {
            const { prompt, second } = window.__refused;
            const text = prompt.widgets.find((w) => w.name === "text");
            text.value = "<i> next to <i>";
            text.callback?.(text.value);
            const scale = LiteGraph.createNode("ImageScale");
            scale.pos = [420, 560];
            app.graph.add(scale);
            second.connect(0, scale, scale.inputs.findIndex((i) => i.type === "IMAGE"));
            scale.connect(0, prompt, prompt.inputs.findIndex((i) => i.name === "images.image1"));
            window.__refused.scale = scale;
        });
        const refused = { through_scale: await state("__refused") };
        await selectAlone("__refused", "second");
        await page.keyboard.press("Control+m");
        refused.loader_muted = await state("__refused");
        await deselect();
        await shot(page, "vue-prompt-node-refused-upstream");
        await selectAlone("__refused", "second");
        await page.keyboard.press("Control+m");
        refused.loader_back = await state("__refused");
        step("refused", { refused });

        // --- a shipped workflow, loaded as ui_check.mjs loads it (test models substituted) ----------------------------
        if (opts.workflow) {
            const workflow = JSON.parse(fs.readFileSync(opts.workflow, "utf8"));
            const substituted = await loadWorkflow(page, workflow, JSON.parse(opts.substitute));
            // name its prompt node and loaders (by their image file: subject 1 is meant for image0)
            await page.evaluate(() => {
                const loader = (file) => app.graph.nodes.find((n) => n.type === "LoadImage"
                    && n.widgets.find((w) => w.name === "image")?.value === file);
                window.__loaded = { prompt: app.graph.nodes.find((n) => n.type === "KosmosGInterleavedPrompt"),
                    first: loader("kosmosg_subject_1.png"), second: loader("kosmosg_subject_2.png") };
            });
            await page.locator(nodeSelector(await page.evaluate(() => window.__loaded.prompt.id))).first()
                .waitFor({ timeout: 30000 }).catch((e) => { report.loaded_dom_error = String(e); });
            const loaded = await state("__loaded");
            await shot(page, "vue-workflow");
            step("workflow", { workflow: { substituted, loaded } });
        }

        step("restored", { restored: await vue.restore() });
    }
} finally {
    await vue?.restore().catch(() => {});
    await browser.close();
}
console.log(JSON.stringify(report));
