// The prompt node's status line in the frontend's Vue node rendering mode ("Nodes 2.0", the setting
// Comfy.VueNodes.Enabled): there the nodes are Vue components in the DOM, not drawn on the canvas, and a DOM
// widget's element is mounted inside the node's component. Reports what it saw as JSON (last stdout line).
//
//   node vue_check.mjs --url http://127.0.0.1:PORT --screenshots DIR [--chromium PATH]
//
// Steps: page load -> enable Vue nodes through the settings API (report `available: false` and stop when the
// served frontend has no such setting) -> a prompt node and two LoadImage nodes, connected -> type a text with
// two <i> into the node's textarea, as a user -> read the status line from the DOM (present, visible, text) ->
// bypass the second loader with Ctrl+B -> read it again. Screenshots of both moments.

import { parseArgs } from "node:util";

import { launchChromium, newReport, promptWithTwoLoaders, recordErrors, screenshotsIn } from "./chromium.mjs";

const { values: opts } = parseArgs({
    options: {
        url: { type: "string" },
        screenshots: { type: "string" },
        chromium: { type: "string", default: process.env.CHROMIUM_PATH || "" },
        timeout: { type: "string", default: "120" },
    },
});
const TIMEOUT_MS = Number(opts.timeout) * 1000;
const SETTING = "Comfy.VueNodes.Enabled";
const { report, step } = newReport();
const shot = screenshotsIn(opts.screenshots);
const browser = await launchChromium(opts.chromium);
let restore = null;  // settings are stored on the server: leave the mode as it was for the other browser checks
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
    const before = await page.evaluate((id) => app.extensionManager.setting.get(id), SETTING);
    report.available = typeof before === "boolean";
    if (!report.available) {
        step("no_vue_nodes", { setting_value: before ?? null });
    } else {
        restore = () => page.evaluate(async ([id, value]) => app.extensionManager.setting.set(id, value), [SETTING, before]);
        await page.evaluate(async (id) => {
            if (app.extensionManager.setting.get("Comfy.Minimap.Visible")) await app.extensionManager.setting.set("Comfy.Minimap.Visible", false);
            await app.extensionManager.setting.set(id, true);
        }, SETTING).catch((e) => { report.setting_error = String(e); });
        await page.evaluate(() => app.graph.clear());
        await page.keyboard.press("Escape");
        const ids = await promptWithTwoLoaders(page, "__vk", { prompt: [520, 120], first: [60, 90], second: [60, 470] },
            "kosmosg_subject_2.png");
        // the node is a Vue component now: its root carries data-node-id
        const nodeSelector = `[data-node-id="${ids.prompt}"]`;
        await page.locator(nodeSelector).first().waitFor({ timeout: 30000 }).catch((e) => { report.node_dom_error = String(e); });
        const state = async () => {
            await page.waitForTimeout(400);
            await page.waitForFunction(() => !window.__vk.prompt.kosmosgRefreshPending, null, { timeout: 15000 });
            return page.evaluate((nodeSelector) => {
                const { prompt, second } = window.__vk;
                const summaries = [...document.querySelectorAll("[data-testid='kosmosg-status-summary']")];
                const element = summaries[0];
                const box = element?.getBoundingClientRect();
                const style = element ? getComputedStyle(element) : null;
                const hit = box && box.width > 0 ? document.elementFromPoint(box.x + Math.min(5, box.width / 2), box.y + box.height / 2) : null;
                return {
                    vue_mode: app.extensionManager.setting.get("Comfy.VueNodes.Enabled"),
                    vue_node_elements: document.querySelectorAll("[data-node-id]").length,
                    summary_count: summaries.length,
                    summary_in_node: !!element?.closest(nodeSelector),
                    summary_connected: !!element?.isConnected,
                    summary_text: element?.textContent ?? null,
                    summary_box: box ? [box.x, box.y, box.width, box.height].map(Math.round) : null,
                    summary_visible: !!(box && box.width > 0 && box.height > 0 && style.visibility !== "hidden"
                        && style.display !== "none" && Number(style.opacity) > 0 && element.checkVisibility?.() !== false),
                    summary_on_top: !!(hit && (hit === element || element.contains(hit) || hit.closest?.("[data-testid='kosmosg-status']"))),
                    preview_text: document.querySelector("[data-testid='kosmosg-status-preview']")?.textContent ?? null,
                    status: prompt.kosmosgStatus ?? null,
                    text_value: prompt.widgets.find((w) => w.name === "text")?.value ?? null,
                    labels: prompt.inputs.filter((i) => i.name.startsWith("images.")).map((i) => i.label ?? null),
                    // what the node's component shows: its socket names are text in the page, not on the canvas
                    node_text: document.querySelector(nodeSelector)?.innerText ?? null,
                    second_mode: second.mode,
                };
            }, nodeSelector);
        };
        const connected = await state();
        // type like a user into the prompt node's textarea (inside its Vue component)
        const textarea = page.locator(`${nodeSelector} textarea`).first();
        let typeError = null;
        try {
            await textarea.click({ timeout: 15000 });
            await textarea.press("Control+a");
            await textarea.pressSequentially("a photo of <i> next to <i>", { delay: 5 });
        } catch (e) {
            typeError = String(e);
        }
        const typed = await state();
        await shot(page, "vue-prompt-node");
        // bypass the second loader: select it alone, Ctrl+B on the canvas
        await page.evaluate(() => {
            app.canvas.deselectAll();
            app.canvas.selectItems([window.__vk.second]);
        });
        await page.locator(`[data-node-id="${ids.second}"]`).first().click({ position: { x: 60, y: 12 }, timeout: 15000 })
            .catch((e) => { report.select_error = String(e); });
        await page.keyboard.press("Control+b");
        const bypassed = await state();
        await shot(page, "vue-prompt-node-bypassed-loader");
        await page.keyboard.press("Control+b");
        const unbypassed = await state();
        step("vue", { vue: { ids, connected, typed, type_error: typeError, bypassed, unbypassed } });
        await restore();
        restore = null;
        step("restored", { restored: await page.evaluate((id) => app.extensionManager.setting.get(id), SETTING) === before });
    }
} finally {
    await restore?.().catch(() => {});
    await browser.close();
}
console.log(JSON.stringify(report));
