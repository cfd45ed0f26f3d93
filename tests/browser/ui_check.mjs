// Drives the real ComfyUI frontend in headless Chromium and reports what it saw as JSON.
//
//   node ui_check.mjs --url http://127.0.0.1:PORT --workflow ../../workflows/X.json \
//        --screenshots DIR [--substitute '{"ckpt_name": "tiny.safetensors", ...}'] [--chromium PATH]
//
// The pytest wrapper (tests/integration/test_browser.py) starts the server and asserts on the
// JSON printed on the last stdout line; this script only observes (it fails only when the page
// cannot be driven at all), so every assertion lives in one place and names what it expected.
//
// Steps: page load -> our extension registered -> node library (registered types + the search
// box) -> a fresh prompt node: type text, connect a LoadImage, watch sockets and the status line
// -> load a workflow from workflows/, substitute test models, queue it through the UI -> wait for
// the output image on the SaveImage node -> copy + paste its prompt node with the keyboard (alone with
// its connections, together with its image loaders, alone without links) -> bypass / mute image loaders
// with Ctrl+B / Ctrl+M and watch the status line (and what graphToPrompt sends), also behind an active
// Upscale Image -> the same with the prompt node inside a subgraph, and with a subgraph node between a
// loader and the prompt node. Screenshots at the interesting moments.

import fs from "node:fs";
import { parseArgs } from "node:util";

import { launchChromium, loadWorkflow, newReport, promptWithTwoLoaders, recordErrors, screenshotsIn } from "./chromium.mjs";

const { values: opts } = parseArgs({
    options: {
        url: { type: "string" },
        workflow: { type: "string" },
        screenshots: { type: "string" },
        substitute: { type: "string", default: "{}" },
        chromium: { type: "string", default: process.env.CHROMIUM_PATH || "" },
        timeout: { type: "string", default: "120" },
    },
});
const TIMEOUT_MS = Number(opts.timeout) * 1000;
const { report, step } = newReport();
const shot = screenshotsIn(opts.screenshots);
const browser = await launchChromium(opts.chromium);
try {
    const page = await browser.newPage({ viewport: { width: 1600, height: 900 }, deviceScaleFactor: 1 });
    recordErrors(page, report);

    // --- 1. page + extension ---------------------------------------------------------------------
    await page.goto(opts.url, { waitUntil: "domcontentloaded", timeout: TIMEOUT_MS });
    await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.KosmosGLoader
        && window.app.canvas, null, { timeout: TIMEOUT_MS });
    await page.evaluate(async () => {  // a cleaner canvas for the screenshots
        if (app.extensionManager?.setting?.get?.("Comfy.Minimap.Visible")) await app.extensionManager.setting.set("Comfy.Minimap.Visible", false);
    }).catch(() => {});
    step("loaded", await page.evaluate(() => ({
        extension_registered: app.extensions.some((e) => e.name === "KosmosG.interleavedPrompt"),
        extension_urls: performance.getEntriesByType("resource").map((r) => r.name)
            .filter((n) => n.includes("kosmosg_prompt.js")),
    })));

    // --- 2. node library: registered types, and the search box a user types into -----------------
    step("library", await page.evaluate(() => ({
        kosmosg_category_nodes: Object.entries(LiteGraph.registered_node_types)
            .filter(([, cls]) => cls.category === "Kosmos-G").map(([id]) => id).sort(),
    })));
    await page.evaluate(() => app.graph.clear());
    await page.keyboard.press("Escape");
    await page.waitForTimeout(300);
    // a double click on the empty canvas opens the node search box, as for a user; on a loaded
    // machine the first double click can land before the canvas handles input, so try a few times
    const canvasBox = await page.locator("#graph-canvas").boundingBox();
    const searchInput = page.locator("input[placeholder*='Add a node' i], input[placeholder*='Search' i]").first();
    const openSearchBox = async () => {
        for (let attempt = 1; attempt <= 4; attempt++) {
            await page.mouse.dblclick(canvasBox.x + canvasBox.width / 2, canvasBox.y + canvasBox.height / 2);
            try {
                await searchInput.waitFor({ timeout: 10000 });
                return attempt;
            } catch (e) {
                if (attempt === 4) throw e;
                await page.keyboard.press("Escape");
                await page.waitForTimeout(1000);
            }
        }
    };
    let searchResults = [];
    let addedFromSearch = null;
    try {
        report.search_open_attempts = await openSearchBox();
        await searchInput.fill("Kosmos-G");
        await page.locator("[role='option']").first().waitFor({ timeout: 30000 });
        await page.waitForTimeout(500);
        searchResults = await page.locator("[role='option']").allInnerTexts();
        await shot(page, "node-search");
        // pick the prompt node from the results: it must land on the canvas
        await searchInput.fill("Kosmos-G Interleaved Prompt");
        await page.waitForTimeout(800);
        await page.locator("[role='option']", { hasText: "Kosmos-G Interleaved Prompt" }).first().click();
        await page.waitForTimeout(300);
        // the frontend may attach the new node to the pointer ("ghost" placement): drop it with a click
        await page.mouse.move(canvasBox.x + 700, canvasBox.y + 300);
        await page.mouse.click(canvasBox.x + 700, canvasBox.y + 300);
        await page.waitForTimeout(300);
        addedFromSearch = await page.evaluate(() => app.graph.nodes.map((n) => n.type));
    } catch (e) {
        report.search_error = String(e);
        await shot(page, "search-failed").catch(() => {});  // what was on screen, for the failure report
        await page.keyboard.press("Escape");
    }
    step("search", { search_results: searchResults.map((t) => t.replace(/\s+/g, " ").trim()).slice(0, 20),
        added_from_search: addedFromSearch });

    // --- 3. the prompt node: typing, connecting, numbering -----------------------------------------
    await page.evaluate(() => {
        // continue with the node the search box created (a fresh one if the search step failed)
        let prompt = app.graph.nodes.find((n) => n.type === "KosmosGInterleavedPrompt");
        if (!prompt) {
            prompt = LiteGraph.createNode("KosmosGInterleavedPrompt");
            app.graph.add(prompt);
        }
        prompt.pos = [460, 190];
        const image = LiteGraph.createNode("LoadImage");
        image.pos = [90, 130];
        app.graph.add(image);
        window.__kg = { prompt, image };
        app.canvas.ds.offset = [0, 0];
        app.canvas.ds.scale = 1;
        app.canvas.setDirty(true, true);
    });
    await page.waitForTimeout(500);
    const promptState = async () => {
        // the node refreshes in the next animation frame: wait for it (a software-rendered frame on a
        // loaded machine can take longer than the pauses above)
        await page.waitForFunction(() => !window.__kg.prompt.kosmosgRefreshPending, null, { timeout: 15000 });
        return promptSnapshot();
    };
    const promptSnapshot = () => page.evaluate(() => {
        const node = window.__kg.prompt;
        return {
            inputs: node.inputs.map((i, k) => ({ name: i.name, type: i.type, label: i.label ?? null, linked: node.isInputConnected(k) })),
            widgets: node.widgets.map((w) => w.name),
            status: node.kosmosgStatus ?? null,
            status_dom: [...document.querySelectorAll("[data-testid='kosmosg-status-summary']")].map((e) => e.textContent),
            preview_dom: [...document.querySelectorAll("[data-testid='kosmosg-status-preview']")].map((e) => e.textContent),
        };
    });
    const created = await promptState();
    // type like a user: into the prompt node's textarea, replacing its default text
    const textarea = page.locator("textarea.comfy-multiline-input").first();
    await textarea.click();
    await textarea.press("Control+a");
    await textarea.pressSequentially("a photo of <i> wearing a hat", { delay: 5 });
    await page.waitForTimeout(300);
    const typedOne = await promptState();
    await page.evaluate(() => {
        const { prompt, image } = window.__kg;
        image.connect(0, prompt, prompt.inputs.findIndex((i) => i.name === "images.image0"));
    });
    await page.waitForTimeout(500);
    const connected = await promptState();
    await textarea.pressSequentially(" next to <i>", { delay: 5 });
    await page.waitForTimeout(300);
    const typedTwo = await promptState();
    await shot(page, "prompt-node-mismatch", { x: 70, y: 92, width: 920, height: 420 });
    await page.evaluate(() => {
        const { prompt } = window.__kg;
        const second = LiteGraph.createNode("LoadImage");
        second.pos = [90, 500];
        app.graph.add(second);
        const file = second.widgets.find((w) => w.name === "image");
        if (file?.options?.values?.includes("kosmosg_subject_2.png")) {
            file.value = "kosmosg_subject_2.png";
            file.callback?.(file.value);  // LoadImage refreshes its preview from the widget callback
        }
        second.connect(0, prompt, prompt.inputs.findIndex((i) => i.name === "images.image1"));
    });
    await page.waitForTimeout(600);
    const connectedTwo = await promptState();
    const apiPrompt = await page.evaluate(async () => {
        const { output } = await app.graphToPrompt();
        return output[String(window.__kg.prompt.id)];
    });
    await page.mouse.click(canvasBox.x + 1300, canvasBox.y + 850);  // deselect: no selection toolbox in the picture
    await page.waitForTimeout(400);
    await shot(page, "prompt-node", { x: 70, y: 92, width: 920, height: 790 });
    // per-image weights appear on the sockets; a wrong count is flagged
    const setWeights = (text) => page.evaluate((text) => {
        const widget = window.__kg.prompt.widgets.find((w) => w.name === "weights");
        widget.value = text;
        widget.callback?.(widget.value);  // what the canvas text prompt does after editing
    }, text);
    await setWeights("1.0, 0.5");
    await page.waitForTimeout(300);
    const weighted = await promptState();
    await setWeights("1.0");
    await page.waitForTimeout(300);
    const badWeights = await promptState();
    // weights written in the text (`<i:0.25>`) multiply with the list's; a bad one is flagged as typed
    const typedText = await textarea.inputValue();
    await setWeights("2, 1");
    await textarea.click();
    await textarea.press("Control+a");
    await textarea.pressSequentially("a photo of <i:0.25> wearing a hat next to <i:0.5>", { delay: 5 });
    await page.waitForTimeout(300);
    const writtenWeights = await promptState();
    await textarea.pressSequentially(" and <i:O.8>", { delay: 5 });
    await page.waitForTimeout(300);
    const badWrittenWeight = await promptState();
    await textarea.press("Control+a");
    await textarea.pressSequentially(typedText, { delay: 5 });
    await setWeights("");
    // a third image with no placeholder for it
    await page.evaluate(() => {
        const { prompt, image } = window.__kg;
        image.connect(0, prompt, prompt.inputs.findIndex((i) => i.name === "images.image2"));
    });
    await page.waitForTimeout(600);
    const extraImage = await promptState();
    await page.evaluate(() => {
        const { prompt } = window.__kg;
        prompt.disconnectInput(prompt.inputs.findIndex((i) => i.name === "images.image2"));
    });
    await page.waitForTimeout(600);
    // unplug the first image: its socket stays (Autogrow keeps middle sockets); the server skips it,
    // so the remaining image fills <i>1 and the labels must say so
    await page.evaluate(() => {
        const { prompt } = window.__kg;
        prompt.disconnectInput(prompt.inputs.findIndex((i) => i.name === "images.image0"));
    });
    await page.waitForTimeout(600);
    const gap = await promptState();
    // text from a link (a String node): the widget's hidden value is not what the server gets, so it is not counted
    await page.evaluate(() => {
        const { prompt } = window.__kg;
        const source = LiteGraph.createNode("PrimitiveStringMultiline");
        source.pos = [90, 900];
        app.graph.add(source);
        source.widgets.find((w) => w.name === "value").value = "a <i> and a <i>";
        source.connect(0, prompt, prompt.inputs.findIndex((i) => i.name === "text"));
        window.__kg.textSource = source;
    });
    await page.waitForTimeout(600);
    const linkedText = await promptState();
    await setWeights("1, 2");  // the typed weights list is still checked against the images
    await page.waitForTimeout(300);
    const linkedTextBadWeights = await promptState();
    await setWeights("");
    // the String node muted: graphToPrompt sends the prompt node's own (hidden) text, which the server checks
    // before the run, so the status counts it (a review found it still saying "from a link")
    await page.evaluate(() => { window.__kg.textSource.mode = 2; });
    await page.waitForTimeout(600);
    const mutedTextSource = { ...(await promptState()), api_text: await page.evaluate(async () =>
        (await app.graphToPrompt()).output[String(window.__kg.prompt.id)]?.inputs?.text ?? null) };
    await page.evaluate(() => { window.__kg.textSource.mode = 0; });
    await page.waitForTimeout(600);
    await page.evaluate(() => {
        const { prompt, textSource } = window.__kg;
        prompt.disconnectInput(prompt.inputs.findIndex((i) => i.name === "text"));
        app.graph.remove(textSource);
    });
    await page.waitForTimeout(600);
    const unlinkedText = await promptState();
    step("prompt_node", { prompt_node: { created, typed_one: typedOne, connected, typed_two: typedTwo,
        connected_two: connectedTwo, weighted, bad_weights: badWeights, written_weights: writtenWeights,
        bad_written_weight: badWrittenWeight, typed_text: typedText, extra_image: extraImage, gap,
        linked_text: linkedText, linked_text_bad_weights: linkedTextBadWeights, muted_text_source: mutedTextSource,
        unlinked_text: unlinkedText, api_inputs: apiPrompt?.inputs ?? null } });

    // --- 4. a shipped workflow: load, substitute test models, queue, wait for the image -------------
    const workflow = JSON.parse(fs.readFileSync(opts.workflow, "utf8"));
    const substitutions = JSON.parse(opts.substitute);
    const substituted = await loadWorkflow(page, workflow, substitutions);
    const loaded = await page.evaluate(async () => {
        await app.extensionManager?.command?.execute?.("Comfy.Canvas.FitView");
        app.canvas.setDirty(true, true);
        const prompt = app.graph.nodes.find((n) => n.type === "KosmosGInterleavedPrompt");
        return { node_types: app.graph.nodes.map((n) => n.type).sort(),
            prompt_labels: prompt?.inputs.filter((i) => i.name.startsWith("images.")).map((i) => i.label ?? i.name),
            prompt_sockets: prompt?.inputs.map((input, slot) => [input.name, prompt.isInputConnected(slot)])
                .filter(([name]) => name.startsWith("images.")) };
    });
    loaded.substituted = substituted;
    await page.waitForTimeout(500);
    await page.evaluate(() => {  // fitting a large graph can zoom below the level where the canvas draws text
        const ds = app.canvas.ds;
        if (ds.scale < 0.62) ds.changeScale(0.62, [app.canvas.canvas.width / 2, app.canvas.canvas.height / 2]);
        app.canvas.setDirty(true, true);
    });
    await page.waitForTimeout(300);
    loaded.prompt_status = await page.evaluate(
        () => app.graph.nodes.find((n) => n.type === "KosmosGInterleavedPrompt")?.kosmosgStatus ?? null);
    await page.waitForTimeout(300);
    await shot(page, "workflow");
    step("workflow_loaded", { workflow: loaded });

    const started = Date.now();
    await page.evaluate(() => app.queuePrompt(0, 1));
    // SaveImage gets its `images` from the "executed" message; the frontend then loads them as <img>
    const handle = await page.waitForFunction(() => {
        const save = app.graph.nodes.find((n) => n.type === "SaveImage");
        const output = save && app.nodeOutputs?.[String(save.id)];
        const imgs = save?.imgs ?? [];
        if (!output?.images?.length || !imgs.length || !imgs.every((img) => img.complete && img.naturalWidth > 0)) return null;
        return { images: output.images, natural_sizes: imgs.map((img) => [img.naturalWidth, img.naturalHeight]),
            srcs: imgs.map((img) => img.src) };
    }, null, { timeout: TIMEOUT_MS, polling: 250 });
    const result = await handle.jsonValue();
    const view = await page.evaluate(async (src) => {
        const response = await fetch(src);
        const bytes = new Uint8Array(await response.arrayBuffer());
        return { status: response.status, type: response.headers.get("content-type"), head: Array.from(bytes.slice(0, 8)) };
    }, result.srcs[0]);
    await page.waitForTimeout(300);
    await shot(page, "workflow-output");
    step("queued", { output: { ...result, view, seconds: (Date.now() - started) / 1000 } });

    // --- 5. copy + paste the prompt node with the keyboard, as users do --------------------------------
    // Ctrl+Shift+V pastes the node alone wired to the same image loaders; Ctrl+C / Ctrl+V of the node
    // with its loaders pastes the group wired among itself. Report each copy's sockets (and where their
    // links come from) and what the API prompt would send for it.
    // the shortcuts act on the canvas: click an empty spot of it first (as a user would), one with no
    // node, group or floating button (zoom controls, toolbox) on it
    const clickEmptyCanvas = async () => {
        const emptySpot = await page.evaluate((box) => {
            for (let y = 820; y > 100; y -= 40) for (let x = 1200; x > 100; x -= 40) {
                const [gx, gy] = app.canvas.ds.convertCanvasToOffset([x, y]);
                const shown = app.canvas.graph ?? app.graph;  // a subgraph, once opened
                if (!shown.getNodeOnPos(gx, gy) && !shown.getGroupOnPos?.(gx, gy)
                    && document.elementFromPoint(box.x + x, box.y + y) === app.canvas.canvas) return [x, y];
            }
            return [1200, 820];
        }, canvasBox);
        await page.mouse.click(canvasBox.x + emptySpot[0], canvasBox.y + emptySpot[1]);
    };
    await clickEmptyCanvas();
    const copyPaste = async (withLoaders, keys) => {
        const before = await page.evaluate((withLoaders) => {
            const prompt = app.graph.nodes.find((n) => n.type === "KosmosGInterleavedPrompt");
            const loaders = prompt.inputs.filter((i) => i.link != null)
                .map((i) => app.graph.getNodeById(app.graph.links[i.link].origin_id));
            app.canvas.deselectAll();
            app.canvas.selectItems(withLoaders ? [prompt, ...loaders] : [prompt]);
            return app.graph.nodes.map((n) => n.id);
        }, withLoaders);
        await page.keyboard.press("Control+c");
        await page.keyboard.press(keys);
        await page.waitForFunction((before) => app.graph.nodes.some((n) => n.type === "KosmosGInterleavedPrompt"
            && !before.includes(n.id) && !n.kosmosgRefreshPending), before, { timeout: 15000 });
        return page.evaluate(async (before) => {
            const copy = app.graph.nodes.find((n) => n.type === "KosmosGInterleavedPrompt" && !before.includes(n.id));
            const { output } = await app.graphToPrompt();
            return {
                sockets: copy.inputs.map((input, slot) => {
                    const link = input.link == null ? null : app.graph.links[input.link];
                    const origin = link ? app.graph.getNodeById(link.origin_id) : null;
                    return { name: input.name, linked: copy.isInputConnected(slot),
                        from: origin ? `${origin.type}${before.includes(origin.id) ? "" : " (copy)"}` : null };
                }).filter((s) => s.name.startsWith("images.")),
                status: copy.kosmosgStatus?.summary ?? null,
                api_image_inputs: Object.keys(output[String(copy.id)]?.inputs ?? {}).filter((k) => k.startsWith("images.")),
            };
        }, before);
    };
    const pasteConnected = await copyPaste(false, "Control+Shift+v");
    const pasteGroup = await copyPaste(true, "Control+v");
    // the node alone, without its links (Ctrl+V): a copy with no image connected needs just one socket
    const pasteAlone = await copyPaste(false, "Control+v");
    step("copy_paste", { copy_paste: { paste_connected: pasteConnected, paste_group: pasteGroup, paste_alone: pasteAlone } });

    // --- 6. bypassed / muted image loaders: Ctrl+B and Ctrl+M on the selected node, as users do ----------
    // graphToPrompt sends no image from a muted node, nor from a bypassed one unless it passes an IMAGE on from
    // its own input; the status line must count what would be sent. A fresh graph: two loaders into a prompt
    // with two <i>; later an ImageScale (passes its IMAGE input through when bypassed) and a Reroute between.
    // a fresh graph: prompt + two loaders kept as window[name], the prompt's text with two <i>
    const twoLoaderGraph = async (name, positions) => {
        await page.evaluate(() => app.graph.clear());
        await promptWithTwoLoaders(page, name, positions);
        await page.evaluate((name) => {
            const text = window[name].prompt.widgets.find((w) => w.name === "text");
            text.value = "<i> next to <i>";
            text.callback?.(text.value);
        }, name);
    };
    await twoLoaderGraph("__modes", { prompt: [560, 150], first: [90, 60], second: [90, 460] });
    // The prompt node's status and what graphToPrompt sends, for the nodes kept in window[name] = { prompt, ... }
    // (named so the report reads "first", "scale" rather than node ids). A node inside a subgraph has the execution
    // id "<subgraph node id>:<its id>" in the API prompt.
    const graphState = async (name) => {
        await page.waitForTimeout(300);
        await page.waitForFunction((name) => !window[name].prompt.kosmosgRefreshPending, name, { timeout: 15000 });
        return page.evaluate(async (name) => {
            const nodes = window[name];
            const { prompt } = nodes;
            const graphs = [app.graph, ...(app.graph.subgraphs?.values() ?? [])];
            const executionId = (node) => {
                const path = [node.id];
                for (let graph = node.graph; graph && graph !== app.graph;) {
                    const instance = graphs.flatMap((g) => g.nodes).find((n) => n.subgraph === graph);
                    if (!instance) break;
                    path.unshift(instance.id);
                    graph = instance.graph;
                }
                return path.join(":");
            };
            const nameOf = (id) => Object.entries(nodes).find(([, n]) => executionId(n) === id)?.[0] ?? id;
            const { output } = await app.graphToPrompt();
            const sentLinks = (node) => Object.entries(output[executionId(node)]?.inputs ?? {})
                .filter(([, v]) => Array.isArray(v));
            const widget = prompt.widgets.find((w) => w.name === "kosmosg_status");
            return {
                modes: Object.fromEntries(Object.entries(nodes).map(([key, node]) => [key, node.mode])),
                titles: Object.fromEntries(Object.entries(nodes).map(([key, node]) => [key, node.title])),
                status: prompt.kosmosgStatus ?? null,
                status_dom: widget?.kosmosgElements?.status.textContent ?? null,
                labels: Object.fromEntries(prompt.inputs.filter((i) => i.name.startsWith("images."))
                    .map((i) => [i.name, i.label ?? null])),
                // what queueing would send: socket -> [origin node id, slot], and which of our nodes that is
                api_images: Object.fromEntries(sentLinks(prompt).filter(([k]) => k.startsWith("images."))
                    .map(([k, v]) => [k, nameOf(v[0])])),
                // every named node's linked inputs that graphToPrompt sends (a node missing there is not sent)
                api_links: Object.fromEntries(Object.entries(nodes).filter(([, node]) => output[executionId(node)])
                    .map(([key, node]) => [key, sentLinks(node).map(([k]) => k)])),
            };
        }, name);
    };
    // select the named nodes of window[name] alone and press the shortcut on the canvas
    const toggle = async (name, nodes, keys) => {
        await clickEmptyCanvas();
        await page.evaluate(({ name, nodes }) => {
            app.canvas.deselectAll();
            app.canvas.selectItems(nodes.map((node) => window[name][node]));
        }, { name, nodes });
        await page.keyboard.press(keys);
        return graphState(name);
    };
    const modeState = () => graphState("__modes");
    const modes = { both: await modeState() };
    modes.bypassed = await toggle("__modes", ["second"], "Control+b");
    await page.mouse.click(canvasBox.x + 1300, canvasBox.y + 850);  // deselect: no selection toolbox in the picture
    await page.waitForTimeout(300);
    await shot(page, "prompt-node-bypassed-loader", { x: 70, y: 40, width: 1000, height: 780 });
    modes.unbypassed = await toggle("__modes", ["second"], "Control+b");
    modes.muted = await toggle("__modes", ["second"], "Control+m");
    modes.unmuted = await toggle("__modes", ["second"], "Control+m");
    // an ImageScale between the second loader and its socket: bypassed, it hands the loader's image on
    await page.evaluate(() => {
        const { prompt, second } = window.__modes;
        const scale = LiteGraph.createNode("ImageScale");
        scale.pos = [330, 560];
        app.graph.add(scale);
        second.connect(0, scale, scale.inputs.findIndex((i) => i.type === "IMAGE"));
        scale.connect(0, prompt, prompt.inputs.findIndex((i) => i.name === "images.image1"));
        // and a Reroute node between the first loader and its socket
        const reroute = LiteGraph.createNode("Reroute");
        reroute.pos = [420, 100];
        app.graph.add(reroute);
        window.__modes.first.connect(0, reroute, 0);
        reroute.connect(0, prompt, prompt.inputs.findIndex((i) => i.name === "images.image0"));
        Object.assign(window.__modes, { scale, reroute });
    });
    modes.through_scale = await modeState();
    modes.scale_bypassed = await toggle("__modes", ["scale"], "Control+b");
    // unplug / replug the bypassed ImageScale's own input: a link change upstream, none at the prompt node;
    // then a click on the canvas, as the mouse-up that ends a user's link drag (the frontend's change tracker
    // compares the graph after it and sends "graphChanged")
    const plugScale = async (plug) => {
        await page.evaluate((plug) => {
            const { scale, second } = window.__modes;
            const slot = scale.inputs.findIndex((i) => i.type === "IMAGE");
            if (plug) second.connect(0, scale, slot);
            else scale.disconnectInput(slot);
        }, plug);
        await clickEmptyCanvas();
    };
    await plugScale(false);
    modes.scale_bypassed_unplugged = await modeState();
    await plugScale(true);
    modes.scale_bypassed_replugged = await modeState();
    modes.scale_and_loader_bypassed = await toggle("__modes", ["second"], "Control+b");
    modes.scale_bypassed_loader_muted = await toggle("__modes", ["second"], "Control+m");
    modes.first_muted_behind_reroute = await toggle("__modes", ["first"], "Control+m");
    // the ImageScale active again, its loader muted: graphToPrompt sends the ImageScale without its image, and
    // the server refuses the whole prompt ("Required input is missing"); so the status line must name the chain
    modes.first_unmuted = await toggle("__modes", ["first"], "Control+m");
    modes.scale_active_loader_muted = await toggle("__modes", ["scale"], "Control+b");
    await page.mouse.click(canvasBox.x + 1300, canvasBox.y + 850);  // deselect
    await page.waitForTimeout(300);
    await shot(page, "prompt-node-refused-upstream", { x: 70, y: 40, width: 1000, height: 780 });
    modes.scale_active_loader_bypassed = await toggle("__modes", ["second"], "Control+b");
    modes.scale_active_loader_back = await toggle("__modes", ["second"], "Control+b");
    // the refusal behind an optional input: image1 from an ImageCompositeMasked whose optional mask comes from an
    // ImageToMask fed by a third loader. Muting that loader drops the ImageToMask's required image; the mask link
    // itself is sent, and the server checks the ImageToMask it leads to and refuses the prompt
    await page.evaluate(() => {
        const { prompt, first } = window.__modes;
        const third = LiteGraph.createNode("LoadImage");
        const toMask = LiteGraph.createNode("ImageToMask");
        const composite = LiteGraph.createNode("ImageCompositeMasked");
        [[third, [90, 860]], [toMask, [420, 860]], [composite, [700, 700]]].forEach(([node, pos]) => {
            node.pos = pos;
            app.graph.add(node);
        });
        third.widgets.find((w) => w.name === "image").value = first.widgets.find((w) => w.name === "image").value;
        const slot = (node, name) => node.inputs.findIndex((i) => i.name === name);
        third.connect(0, toMask, slot(toMask, "image"));
        first.connect(0, composite, slot(composite, "destination"));
        first.connect(0, composite, slot(composite, "source"));
        toMask.connect(0, composite, slot(composite, "mask"));
        composite.connect(0, prompt, slot(prompt, "images.image1"));
        Object.assign(window.__modes, { third, to_mask: toMask, composite });
    });
    modes.mask_from_third = await modeState();
    modes.mask_loader_muted = await toggle("__modes", ["third"], "Control+m");
    step("modes", { modes });

    // --- 7. subgraphs --------------------------------------------------------------------------------------
    // window[name]'s nodes `keys` into a new subgraph; window[name] then holds the nodes inside it (converting
    // copies them, keeping their ids) and the subgraph node as `subgraph`
    const intoSubgraph = (name, keys) => page.evaluate(({ name, keys }) => {
        const nodes = window[name];
        const { node } = app.graph.convertToSubgraph(new Set(keys.map((key) => nodes[key])));
        for (const key of keys) nodes[key] = node.subgraph.getNodeById(nodes[key].id);
        nodes.subgraph = node;
    }, { name, keys });
    const setMode = (name, key, mode) => page.evaluate(({ name, key, mode }) => { window[name][key].mode = mode; },
        { name, key, mode });
    // (a) the prompt node inside a subgraph with its second loader; the first loader outside feeds it through the
    // subgraph's input. Ctrl+B / Ctrl+M on the loader inside, the canvas showing the subgraph; then the loader
    // outside muted by a script (no user action: only the root graph's mode event says so)
    await twoLoaderGraph("__inside", { prompt: [560, 150], first: [90, 60], second: [90, 460] });
    await intoSubgraph("__inside", ["prompt", "second"]);
    await page.evaluate(() => app.canvas.openSubgraph(window.__inside.subgraph.subgraph, window.__inside.subgraph));
    const inside = { both: await graphState("__inside") };
    inside.bypassed = await toggle("__inside", ["second"], "Control+b");
    inside.unbypassed = await toggle("__inside", ["second"], "Control+b");
    inside.muted = await toggle("__inside", ["second"], "Control+m");
    inside.unmuted = await toggle("__inside", ["second"], "Control+m");
    await setMode("__inside", "first", 2);
    inside.outer_muted = await graphState("__inside");
    await setMode("__inside", "first", 0);
    inside.outer_unmuted = await graphState("__inside");
    await page.evaluate(() => app.canvas.setGraph(app.graph));
    // (b) an ImageScale wrapped in a subgraph between the second loader and the prompt node. Bypassed, a subgraph
    // node passes on what reaches its input (graphToPrompt treats it like any bypassed node); active, the
    // ImageScale inside must get its image. (A PreviewImage on the ImageScale gives the subgraph its output.)
    await twoLoaderGraph("__wrapped", { prompt: [560, 150], first: [90, 60], second: [90, 460] });
    await page.evaluate(() => {
        const nodes = window.__wrapped;
        const scale = LiteGraph.createNode("ImageScale");
        const preview = LiteGraph.createNode("PreviewImage");
        scale.pos = [330, 560];
        preview.pos = [330, 760];
        app.graph.add(scale);
        app.graph.add(preview);
        nodes.second.connect(0, scale, scale.inputs.findIndex((i) => i.type === "IMAGE"));
        scale.connect(0, preview, 0);
        Object.assign(nodes, { scale, preview });
    });
    await intoSubgraph("__wrapped", ["scale"]);
    await page.evaluate(() => {
        const { prompt, subgraph } = window.__wrapped;
        subgraph.connect(0, prompt, prompt.inputs.findIndex((i) => i.name === "images.image1"));
    });
    const wrapped = { through: await graphState("__wrapped") };
    wrapped.bypassed = await toggle("__wrapped", ["subgraph"], "Control+b");
    wrapped.bypassed_loader_muted = await toggle("__wrapped", ["second"], "Control+m");
    wrapped.active_loader_muted = await toggle("__wrapped", ["subgraph"], "Control+b");
    // what the server says to that prompt (validation only: it refuses before running anything)
    wrapped.active_loader_muted.server = await page.evaluate(async () => {
        const { output } = await app.graphToPrompt();
        const response = await fetch("/prompt", { method: "POST", headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ prompt: output }) });
        const answer = await response.json();
        return { status: response.status, node_errors: Object.fromEntries(Object.entries(answer.node_errors ?? {})
            .map(([id, e]) => [id, { class_type: e.class_type, errors: e.errors.map((x) => `${x.message}: ${x.details}`) }])) };
    });
    wrapped.back = await toggle("__wrapped", ["second"], "Control+m");
    step("subgraphs", { subgraphs: { inside, wrapped } });
} finally {
    await browser.close();
}
console.log(JSON.stringify(report));
