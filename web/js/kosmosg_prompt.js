// Kosmos-G Interleaved Prompt: live placeholder/image check and numbered placeholders.
//
// What the node API cannot give the user (the sockets themselves come from the V3 Autogrow
// input, which the frontend grows without any JS here):
//   1. a status line that counts `<i>` placeholders against connected images while typing,
//      green when they match, amber/red with the fix when they do not (the server rejects a
//      mismatch at queue time; this says so before the user queues). An image counts only when
//      queueing would send it: a socket fed by a muted or bypassed loader is named and skipped; a
//      node upstream that the server would refuse, because queueing drops a required input of it
//      (an Upscale Image fed by a muted loader), is named too. Subgraphs are followed as queueing does;
//   2. a preview of the text with each `<i>` numbered ("a photo of <i>₁ wearing <i:0.5>₂"),
//      coloured like the socket that fills it (a placeholder may carry its image's weight, `<i:0.5>`);
//   3. socket labels that say which placeholder each image socket fills, with its weight ("image0 → <i>₁ ×0.5"),
//      including sockets left empty in the middle (the server skips them, so numbering follows
//      connected sockets, not socket indices) and images that have no placeholder;
//   4. one spare socket on a copy: a prompt node pasted, cloned or Alt+dragged without its links
//      keeps one empty socket, not all of the original's.
//
// Only the public extension API is used: app.registerExtension, the node prototype callbacks
// (always chained, never replaced), widget callbacks (chained), node.addDOMWidget, and listeners for the
// graph's and the api's change events (added, never replacing anyone's); the upstream walk only reads the
// graph (links, modes, subgraphs, the node definitions the frontend keeps on each node class).

import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";

const NODE_ID = "KosmosGInterleavedPrompt";
const PLACEHOLDER = "<i>";            // kosmosg_core.config.IMAGE_PLACEHOLDER
// `<i>` or `<i:W>`, W that image's weight, and a weights list's numbers and separators: the rules of
// kosmosg_core.config.PLACEHOLDER_PATTERN and kosmosg_core.prompt (_NUMBER, _EXPONENT_NUMBER, _PLACEHOLDER_WEIGHT,
// _LIST_WEIGHT, _LIST_SEPARATORS), so that the status line passes what the server takes and flags what it refuses,
// for the reason the server gives
const PLACEHOLDER_PATTERN = /<i(?::([^<>]*))?>/g;
const NUMBER = "[-+]?(?:[0-9]+(?:\\.[0-9]*)?|\\.[0-9]+)";
const EXPONENT_NUMBER = new RegExp(`^ *${NUMBER}[eE][-+]?[0-9]+ *$`);  // 1e-1: refused, with its own message
const PLACEHOLDER_WEIGHT = new RegExp(`^ *${NUMBER} *$`);
const LIST_WEIGHT = new RegExp(`^${NUMBER}$`);
const LIST_SEPARATORS = /[,;\s\x1c-\x1f\x85\ufeff]+/;
const MAX_WEIGHT = 10;                 // kosmosg_core.config.MAX_IMAGE_WEIGHT
const MAX_IMAGES = 16;                 // nodes.prompt.MAX_IMAGES: the node's image sockets
const IMAGES_GROUP = "images.";        // V3 Autogrow sockets are named "images.image0", "images.image1", ...
const STATUS_WIDGET = "kosmosg_status";
const SUBSCRIPTS = "₀₁₂₃₄₅₆₇₈₉";
// one colour per placeholder/image pair, repeated; readable on the dark and the light palette
const PAIR_COLOURS = ["#4fc3f7", "#ffb74d", "#81c784", "#f06292", "#ba68c8", "#fff176", "#4db6ac", "#e57373"];
const OK_COLOUR = "#66bb6a";
const MIN_WIDTH = 420;
const WARN_COLOUR = "#ffa726";
// LiteGraph's LGraphEventMode values (not exported to extensions): what Ctrl+M and Ctrl+B set
const MODE_NEVER = 2;                  // "muted": graphToPrompt leaves the node out, its links with it
const MODE_BYPASS = 4;                 // "bypassed": its outputs take the matching input's link instead
// how many nodes upstream of one image socket the status line checks for a required input graphToPrompt drops
// (the status refreshes on every keystroke; what lies beyond counts as fine)
const WALK_LIMIT = 1000;

/** 12 -> "₁₂" (placeholder numbers start at 1, like the user counts). */
export function subscript(n) {
    return String(n).split("").map((d) => SUBSCRIPTS[Number(d)]).join("");
}

/** The placeholders of `text`, left to right, as kosmosg_core.prompt.split_placeholders reads them:
 * [{start, end, source ("<i:0.5>"), weight (1 for plain <i>), error (null, or why the weight is refused)}]. */
export function findPlaceholders(text) {
    if (typeof text !== "string") return [];
    return [...text.matchAll(PLACEHOLDER_PATTERN)].map((match, k) => {
        const written = match[1];
        const weight = written === undefined ? 1 : PLACEHOLDER_WEIGHT.test(written) ? Number(written) : NaN;
        const error = Number.isNaN(weight) ? (EXPONENT_NUMBER.test(written)
            ? `${match[0]} writes its weight with an exponent (write a plain decimal, e.g. <i:0.8>)`
            : `${match[0]} is not a weight (write e.g. <i:0.8>)`)
            : weight < 0 || weight > MAX_WEIGHT ? `${match[0]} is outside 0..${MAX_WEIGHT}` : null;
        return { start: match.index, end: match.index + match[0].length, source: match[0], weight, error,
            number: k + 1 };
    });
}

/** 0.30000000000000004 -> "0.3": a product of two weights, as a label shows it. */
function formatWeight(weight) {
    return String(Number(weight.toPrecision(6)));
}

/** "1.0, 0.8" -> [1, 0.8]; blank -> null (1.0 each); a bad entry -> {error}. Mirrors
 *  kosmosg_core.prompt.parse_image_weights (a separator alone is 0 values, not blank). */
export function parseWeights(text) {
    const parts = (text || "").split(LIST_SEPARATORS).filter((p) => p.length > 0);
    if (parts.length === 0 && !/[,;]/.test(text || "")) return null;
    const values = parts.map(Number);
    const bad = parts.find((p, k) => !LIST_WEIGHT.test(p) || values[k] < 0 || values[k] > MAX_WEIGHT);
    if (bad === undefined) return values;
    const why = EXPONENT_NUMBER.test(bad) ? `is written with an exponent (write a plain decimal in 0..${MAX_WEIGHT})`
        : LIST_WEIGHT.test(bad) ? `is outside 0..${MAX_WEIGHT}` : `is not a number in 0..${MAX_WEIGHT}`;
    return { error: `weights: "${bad}" ${why}` };
}

/** The node's image sockets in socket order: [{input, index (socket number), linked, blocked, refused}]: for a
 * linked socket, `blocked` says why it sends no image once queued, `refused` why the server would refuse the node
 * that sends it (see whatBlocks); null when neither. */
function imageSockets(node) {
    // node.isInputConnected(slot), not input.link: frontends from 1.53 on deprecate reading input.link (a
    // console warning now, gone later); the method exists in every frontend ComfyUI >= 0.30 ships
    return (node.inputs || [])
        .map((input, slot) => ({ input, slot }))
        .filter(({ input }) => input.name.startsWith(IMAGES_GROUP))
        .map(({ input, slot }) => {
            const linked = node.isInputConnected(slot);
            const found = linked ? blockedOrNull(node, slot, input.type) : null;
            return { input, index: Number(input.name.match(/(\d+)$/)?.[1] ?? -1), linked,
                blocked: found && !found.cause ? found : null, refused: found?.cause ? found : null };
        })
        .sort((a, b) => a.index - b.index);
}

/** whatBlocks, where a graph it does not know (another frontend's node kinds) makes it throw: then the image
 * counts as arriving, as before the walk existed, rather than the status line stopping for good. */
function blockedOrNull(node, slot, type) {
    try {
        return whatBlocks(node, slot, type);
    } catch (error) {
        console.warn("[Kosmos-G] could not follow the link into", node.id, slot, error);
        return null;
    }
}

/** The link into `node`'s input `slot` in the graph the node is in, or null. LGraphNode's own getInputLink, also
 * for a subgraph node: its override answers with the link inside it that feeds its output of that number. Not
 * input.link (see imageSockets). */
function inputLink(node, slot) {
    if (!node?.graph || !(slot >= 0)) return null;
    const getInputLink = globalThis.LiteGraph?.LGraphNode?.prototype?.getInputLink ?? node.getInputLink;
    return getInputLink?.call(node, slot) ?? null;
}

/** LiteGraph's own type check (window.LiteGraph, as the frontend's bypass rule uses it); plain equality or a
 * wildcard where it is missing. */
function linkTypesMatch(a, b) {
    return globalThis.LiteGraph?.isValidConnection?.(a, b) ?? (a === b || !a || !b || a === "*" || b === "*");
}

/** Which input of a bypassed `node` its output `slot` passes on for a socket of `type`, or -1: the same rule
 * as the frontend's ExecutableNodeDTO._getBypassSlotIndex (same slot number when its type fits, else the first
 * input of exactly that type, else the first compatible one). A LoadImage has no IMAGE input: -1. */
function bypassInput(node, slot, type) {
    const inputs = node.inputs || [];
    const outputType = node.outputs?.[slot]?.type;
    if (type === "*" || type === "") return inputs.length > slot ? slot : 0;
    const same = inputs[slot];
    if (same && linkTypesMatch(same.type, outputType) && linkTypesMatch(same.type, type)) return slot;
    const exact = inputs.findIndex((input) => input.type === type);
    if (exact !== -1) return exact;
    return inputs.findIndex((input) => linkTypesMatch(input.type, outputType) && linkTypesMatch(input.type, type));
}

/** The subgraph node that shows `graph` (a subgraph), when exactly one does: a link from a subgraph's input
 * comes from that node's input of the same number. With several (or none) the walk cannot tell which one the
 * prompt node's status is about. */
function onlyInstanceOf(graph) {
    const instances = workflowGraphs()
        .flatMap((g) => (g.nodes ?? []).filter((n) => n.isSubgraphNode?.() && n.subgraph === graph));
    return instances.length === 1 ? instances[0] : null;
}

// What the upstream walk finds (whatBlocks): the real node whose output a link resolves to, or why nothing is
// sent. `path` is the list of subgraph nodes the walk went into, outermost first.
const sent = (node, slot, path) => ({ source: { node, slot, path } });
const nothing = (node, why, slot) => ({ blocked: { node, why, slot } });  // slot: the input with nothing linked
const UNKNOWN = {};  // the walk cannot tell (a cycle, a link it cannot follow): counts as sent, as before it existed

/** What graphToPrompt makes of the link into `node`'s input `slot` (ExecutableNodeDTO.resolveInput, frontend
 * 1.47): the link's origin output, or, from a subgraph's input, the input of the subgraph node outside. Nothing
 * connected: nothing is sent, and `emptyWhy` says why ("bypassed" for the input a bypassed node would pass on). */
function resolveInput(node, slot, type, path, emptyWhy, seen) {
    const key = `${path.map((n) => n.id).join(":")}:${node.id}[I]${slot}`;
    if (seen.has(key)) return UNKNOWN;  // a cycle: graphToPrompt throws its own error for it
    seen.add(key);
    const link = inputLink(node, slot);
    if (!link) return nothing(node, emptyWhy, slot);
    if (link.originIsIoNode) {
        const outer = path.at(-1) ?? onlyInstanceOf(node.graph);
        if (!outer) return UNKNOWN;
        return resolveInput(outer, link.origin_slot, outer.inputs?.[link.origin_slot]?.type, path.slice(0, -1),
            "unconnected", seen);
    }
    const origin = node.graph.getNodeById?.(link.origin_id);
    return origin ? resolveOutput(origin, link.origin_slot, type ?? node.inputs?.[slot]?.type, path, seen) : UNKNOWN;
}

/** What graphToPrompt sends for `node`'s output `slot` (ExecutableNodeDTO.resolveOutput): a muted node nothing; a
 * bypassed one (a subgraph node too) what reaches the input bypassInput picks; a subgraph node what reaches the
 * output inside it; a virtual node (Reroute) what reaches its input; any other node its own output. */
function resolveOutput(node, slot, type, path, seen) {
    const key = `${path.map((n) => n.id).join(":")}:${node.id}[O]${slot}`;
    if (seen.has(key)) return UNKNOWN;
    seen.add(key);
    if (node.mode === MODE_NEVER) return nothing(node, "muted");
    if (node.mode === MODE_BYPASS) {
        const passed = bypassInput(node, slot, type);
        // the frontend resolves on with the chosen input's own type
        return passed === -1 ? nothing(node, "bypassed")
            : resolveInput(node, passed, node.inputs[passed]?.type, path, "bypassed", seen);
    }
    if (node.isSubgraphNode?.()) {
        const inner = node.subgraph?.outputNode?.slots?.[slot]?.getLinks?.()?.at(0);
        if (!inner) return nothing(node, "empty");
        const innerNode = node.subgraph.getNodeById(inner.origin_id);
        return innerNode ? resolveOutput(innerNode, inner.origin_slot, type, [...path, node], seen) : UNKNOWN;
    }
    if (node.isVirtualNode) {
        const source = node.resolveVirtualOutput?.(slot);  // cross-graph Set/Get style nodes
        if (source?.node) return resolveOutput(source.node, source.slot, type, path, seen);
        return resolveInput(node, slot, type, path, "unconnected", seen);
    }
    return sent(node, slot, path);
}

/** Whether the server requires `node`'s input `name`: the node definition the frontend keeps on the class
 * (nodeData.inputs, isOptional false for "required"). Inputs the definition does not list (added by a node's own
 * script) count as optional: the walk would rather miss a refusal than flag a prompt the server accepts. */
function isRequiredInput(node, name) {
    const spec = inputSpec(node, name);
    return spec !== undefined && spec.isOptional !== true;
}

/** The node definition's entry for `node`'s input `name` (nodeData.inputs), or undefined: the server validates the
 * inputs its definition declares, and only those. */
function inputSpec(node, name) {
    return node.constructor?.nodeData?.inputs?.[name];
}

/** The first node at or above `source` that the server refuses because graphToPrompt drops the link into one of
 * its required inputs ("Required input is missing"): {node, input, cause} (cause: what stops that input, as
 * `nothing` gives it), or null. A dropped link into an input with a widget (its widget value is sent instead) or
 * into an optional input is no refusal, but the server checks every node a sent link into a declared input leads
 * to, so the walk goes on up through every such input (one a node's own script added is not checked there, nor
 * here); an unconnected required input is not reported (the user sees it, and the server names it). Each node is checked once per socket (`checked`), at most WALK_LIMIT of them, so a large graph
 * costs one bounded pass. */
function refusedAbove(source, checked) {
    const { node, path } = source;
    const key = `${path.map((n) => n.id).join(":")}:${node.id}`;
    if (checked.has(key) || checked.size >= WALK_LIMIT) return null;
    checked.add(key);
    for (const [slot, input] of (node.inputs ?? []).entries()) {
        if (!inputLink(node, slot) || inputSpec(node, input.name) === undefined) continue;
        const found = resolveInput(node, slot, input.type, path, "unconnected", new Set());
        if (found.blocked && !input.widget && isRequiredInput(node, input.name)) {
            return { node, input: input.label || input.localized_name || input.name, cause: found.blocked };
        }
        const above = found.source && refusedAbove(found.source, checked);
        if (above) return above;
    }
    return null;
}

/** Why the image linked to `node`'s input `slot` would not reach the server, or null when it would.
 * Walks upstream as the frontend's graphToPrompt does when it builds the API prompt (resolveInput /
 * resolveOutput above). Two answers: {node, why} when nothing is sent for the socket (why: "muted", "bypassed",
 * "unconnected" for a Reroute or subgraph input with nothing connected, "empty" for a subgraph output with nothing
 * inside); {node, input, cause} when the link is sent but the server refuses `node` upstream, whose required
 * `input` graphToPrompt drops (cause: that input's {node, why}), e.g. an active Upscale Image fed by a muted Load
 * Image. What the walk cannot follow (a link from a subgraph's input where several subgraph nodes show that
 * subgraph) counts as arriving, as before. */
export function whatBlocks(node, slot, type) {
    const found = resolveInput(node, slot, type, [], "unconnected", new Set());
    if (found.blocked) return found.blocked;
    return found.source ? refusedAbove(found.source, new Set()) : null;
}

/** "has no input", "is muted": what stops a node's output (a `nothing` answer of the walk). */
function whyText({ why }) {
    if (why === "unconnected") return "has no input";
    if (why === "empty") return "outputs nothing";
    return `is ${why}`;
}

function nodeName(node) {
    return node.title || node.type || "node";
}

/** "image1's Load Image is bypassed": names the socket and the node that stops its image. */
function blockedNote(index, blocked) {
    return `image${index}'s ${nodeName(blocked.node)} ${whyText(blocked)}`;
}

/** "image1's Upscale Image gets no image: its Load Image is muted": names the socket, the node the server refuses,
 * its input and what drops it. */
function refusedNote(index, refused) {
    return `image${index}'s ${nodeName(refused.node)} gets no ${refused.input}: its ${nodeName(refused.cause.node)} `
        + whyText(refused.cause);
}

function widgetValue(node, name) {
    return node.widgets?.find((w) => w.name === name)?.value ?? "";
}

/** What graphToPrompt sends for `node`'s widget input `name`: typed text (a string), or null when a node's output
 * is sent (known only when the node runs). Typed text is sent where nothing is linked, and where the link sends
 * nothing (its source muted, bypassed with nothing to pass on, a Reroute without input, a legacy Primitive node,
 * which writes its value into the widget): the widget's value; inside a subgraph, a link from the subgraph's input
 * that the subgraph node's own box feeds sends that box's value. (A review found the status line calling such text
 * "from a link" while the server checked it before the run.) */
function sentWidgetText(node, name) {
    const slot = (node.inputs || []).findIndex((input) => input.name === name);
    if (slot === -1 || !node.isInputConnected(slot)) return String(widgetValue(node, name));
    let found;
    try {
        found = resolveInput(node, slot, node.inputs[slot].type, [], "unconnected", new Set());
    } catch (error) {
        console.warn("[Kosmos-G] could not follow the link into", node.id, name, error);
        return null;
    }
    if (!found.blocked) return null;  // a node's output, or a link the walk cannot follow
    // reached through a subgraph's input to the subgraph node's own input, linked to nothing: its box's value, where
    // it has one (a bypassed subgraph node with nothing to pass on is "bypassed": the prompt node's own text)
    const { node: holder, slot: holderSlot, why } = found.blocked;
    const box = why === "unconnected" && holder !== node && holder.isSubgraphNode?.()
        ? holder.inputs?.[holderSlot]?.widget?.name : undefined;
    return String(box !== undefined ? widgetValue(holder, box) : widgetValue(node, name));
}

/** Everything the status line, the preview and the socket labels show, from the node's state.
 * linkedSocketIndices: the sockets whose image link is sent; skipped: a note per socket that is linked but
 * sends nothing (blockedNote), shown as the cause when images are short and as a remark otherwise; refused: a note
 * per sent socket whose node upstream the server refuses (refusedNote), always a problem: the server refuses every
 * output that depends on it (the prompt fails unless another output still validates). */
export function describe(text, linkedSocketIndices, weightsText, skipped = [], refused = []) {
    if (text === null) return describeLinkedText(linkedSocketIndices, weightsText, skipped, refused);
    const found = findPlaceholders(text);
    const placeholders = found.length;
    const images = linkedSocketIndices.length;
    const weights = weightsText === null ? null : parseWeights(weightsText);  // null: from a link
    const listed = Array.isArray(weights) && weights.length === images ? weights : null;
    // placeholder k's weight: its `<i:W>` times its entry in the weights list (kosmosg_core.prompt.combine_image_weights)
    const weightOf = (k) => (found[k - 1]?.error ? 1 : found[k - 1]?.weight ?? 1) * (listed?.[k - 1] ?? 1);
    const problems = [...refused];
    problems.push(...found.filter((p) => p.error).map((p) => p.error));
    if (placeholders > MAX_IMAGES) {  // more than the sockets: only removing placeholders helps (as the server says)
        problems.push(`at most ${MAX_IMAGES} images can be connected: remove ${placeholders - MAX_IMAGES} ${PLACEHOLDER}`);
    } else if (placeholders > images) {
        const missing = placeholders - images;
        problems.push(...skipped.map((note) => `${note}, so it sends no image`));
        problems.push(`connect ${missing} more image${missing > 1 ? "s" : ""} or remove ${missing} ${PLACEHOLDER}`);
    } else if (images > placeholders) {
        const extra = images - placeholders;
        problems.push(`add ${extra} ${PLACEHOLDER} to the text or disconnect ${extra} image${extra > 1 ? "s" : ""}`);
    }
    problems.push(...weightsProblems(weights, images));
    found.forEach((p) => {
        const weight = weightOf(p.number);
        if (!p.error && listed && weight > MAX_WEIGHT) {
            problems.push(`image ${p.number}: ${p.weight} in the text × ${listed[p.number - 1]} in weights is outside 0..${MAX_WEIGHT}`);
        }
    });
    const remarks = [...(skipped.length > 0 && placeholders <= images ? [`${skipped.join(", ")}: skipped`] : []),
        ...(weightsText === null ? ["weights from a link: checked when it runs"] : [])];
    const remark = remarks.length > 0 ? ` (${remarks.join("; ")})` : "";
    return {
        placeholders,
        images,
        ok: problems.length === 0,
        summary: `${placeholders} ${PLACEHOLDER} / ${images} image${images === 1 ? "" : "s"}`
            + (problems.length === 0 ? " ✓" : ` ⚠ ${problems.join("; ")}`) + remark,
        // placeholder k (1-based) is filled by the k-th linked socket, whatever its socket number
        socketForPlaceholder: (k) => linkedSocketIndices[k - 1],
        placeholderAt: (k) => found[k - 1],
        weightFor: weightOf,
    };
}

/** What is wrong with a parsed weights list (parseWeights; null: none to check) for `images` images. */
function weightsProblems(weights, images) {
    if (weights?.error) return [weights.error];
    if (weights && weights.length !== images) {
        return [`weights has ${weights.length} value${weights.length === 1 ? "" : "s"} for ${images} image${images === 1 ? "" : "s"}`];
    }
    return [];
}

/** `describe` when the text comes from a link: its value is known only when the node runs (the server checks the
 * placeholder count then), so the widget's hidden value is not counted; the k-th sent socket fills the k-th
 * placeholder of whatever text arrives. The weights list (when typed) must still give one value per image. */
function describeLinkedText(linkedSocketIndices, weightsText, skipped, refused) {
    const images = linkedSocketIndices.length;
    const problems = [...refused];
    const weights = weightsText === null ? null : parseWeights(weightsText);
    problems.push(...weightsProblems(weights, images));
    const remark = skipped.length > 0 ? ` (${skipped.join(", ")}: skipped)` : "";
    return {
        placeholders: images,
        images,
        ok: problems.length === 0,
        summary: `text from a link / ${images} image${images === 1 ? "" : "s"}: the ${PLACEHOLDER} count is checked `
            + `when it runs` + (problems.length === 0 ? "" : ` ⚠ ${problems.join("; ")}`) + remark,
        socketForPlaceholder: (k) => linkedSocketIndices[k - 1],
        placeholderAt: () => undefined,
        // the typed list's weight (the linked text's own `<i:W>` are known only when it runs)
        weightFor: (k) => (Array.isArray(weights) && weights.length === images ? weights[k - 1] : 1),
    };
}

/** The text with every `<i>` / `<i:W>` followed by its number, as a coloured chip (DOM nodes, never innerHTML). */
function renderPreview(element, text, state) {
    element.replaceChildren();
    let start = 0;
    for (let number = 1; number <= state.placeholders; number += 1) {
        const placeholder = state.placeholderAt(number);
        if (placeholder.start > start) element.append(document.createTextNode(text.slice(start, placeholder.start)));
        start = placeholder.end;
        const chip = document.createElement("span");
        const socket = state.socketForPlaceholder(number);
        const missing = socket === undefined || placeholder.error;
        chip.className = "kosmosg-chip";
        chip.textContent = `${placeholder.source}${subscript(number)}`;
        chip.title = placeholder.error ? `placeholder ${number}: ${placeholder.error}`
            : socket === undefined ? `placeholder ${number}: no image connected (or sent) for it`
                : `placeholder ${number}: filled by socket image${socket}`;
        chip.style.color = missing ? WARN_COLOUR : PAIR_COLOURS[(number - 1) % PAIR_COLOURS.length];
        chip.style.fontWeight = "bold";
        if (missing) chip.style.textDecoration = "underline wavy";
        element.append(chip);
    }
    if (start < (text || "").length) element.append(document.createTextNode(text.slice(start)));
    if (!text) element.textContent = "(empty prompt)";
}

// how a socket label says why its image is not sent (whatBlocks' `why`), where the word alone would not do
const SKIPPED_LABELS = { unconnected: "no input", empty: "nothing out" };

/** Socket labels: "image0 → <i>₁ ×0.8", "image1 (empty, skipped)", "image1 (bypassed, skipped)" (linked, but
 * its image is not sent: see whatBlocks), "image1 → <i>₂ (input missing upstream)" (sent, but a node upstream
 * is refused: see whatBlocks), "image2 → no <i>", and the spare
 * socket: "image3 → <i>₄?" while a placeholder lacks its image, else just "image3" (a socket restored
 * from a saved workflow would otherwise show its full "images.image3" name). */
function labelSockets(sockets, state) {
    let ordinal = 0;
    sockets.forEach(({ input, index, linked, blocked, refused }, position) => {
        let label;
        if (linked && blocked) {
            label = `image${index} (${SKIPPED_LABELS[blocked.why] ?? blocked.why}, skipped)`;
            input.color_on = WARN_COLOUR;
        } else if (linked) {
            ordinal += 1;
            const weight = state.weightFor(ordinal);
            label = ordinal <= state.placeholders
                ? `image${index} → ${PLACEHOLDER}${subscript(ordinal)}` + (weight !== 1 ? ` ×${formatWeight(weight)}` : "")
                : `image${index} → no ${PLACEHOLDER}`;
            if (refused) label += " (input missing upstream)";
            input.color_on = refused ? WARN_COLOUR : PAIR_COLOURS[(ordinal - 1) % PAIR_COLOURS.length];
        } else if (position < sockets.length - 1) {
            label = `image${index} (empty, skipped)`;
        } else {
            // the spare socket the Autogrow input keeps at the end: say what connecting it would fill
            label = ordinal < state.placeholders ? `image${index} → ${PLACEHOLDER}${subscript(ordinal + 1)}?` : `image${index}`;
        }
        input.label = label;
    });
}

/** Recompute and show everything; cheap, so it simply runs after every relevant change. */
function refresh(node) {
    const widget = node.widgets?.find((w) => w.name === STATUS_WIDGET);
    if (!widget) return;
    watchGraphs();  // here, not in onNodeCreated: by the first refresh the node is in its graph
    const sockets = imageSockets(node);
    const linked = sockets.filter((s) => s.linked && !s.blocked).map((s) => s.index);
    const skipped = sockets.filter((s) => s.linked && s.blocked);
    const refused = sockets.filter((s) => s.refused);
    // a text or weights input fed by a node's output: known only when it runs (its hidden widget is not sent)
    const text = sentWidgetText(node, "text");
    const weights = sentWidgetText(node, "weights");
    const state = describe(text, linked, weights,
        skipped.map((s) => blockedNote(s.index, s.blocked)), refused.map((s) => refusedNote(s.index, s.refused)));
    const { status, preview } = widget.kosmosgElements;
    status.textContent = state.summary;
    status.style.color = state.ok ? OK_COLOUR : WARN_COLOUR;
    if (text === null) preview.replaceChildren(document.createTextNode("(text from a link)"));
    else renderPreview(preview, text, state);
    labelSockets(sockets, state);
    // read by the browser test and handy in the devtools console
    node.kosmosgStatus = { placeholders: state.placeholders, images: state.images, ok: state.ok, summary: state.summary,
        skipped: skipped.map((s) => ({ socket: `image${s.index}`, node: s.blocked.node.id, why: s.blocked.why })),
        refused: refused.map((s) => ({ socket: `image${s.index}`, node: s.refused.node.id, input: s.refused.input,
            cause: s.refused.cause.node.id, why: s.refused.cause.why })) };
    node.setDirtyCanvas?.(true, true);
}

/** Put the image sockets back in one block in socket order (image0, image1, ...) where image0 sits.
 * The frontend's configure() (paste, clone, Alt+drag, copying: it clones the node) keeps the sockets a
 * fresh node has (image0, text, weights) and appends the saved ones after them (image1, image2, ...);
 * the copied links keep the original slot numbers, so a paste with connections (Ctrl+Shift+V, or the
 * image loaders copied along) connected image1 to the text socket (refused) and lost every image but
 * the first. Links already attached follow their socket. */
function keepImageSocketsInOrder(node) {
    const inputs = node.inputs || [];
    const first = inputs.findIndex((input) => input.name.startsWith(IMAGES_GROUP));
    if (first === -1) return;
    const socketIndex = (input) => Number(input.name.match(/(\d+)$/)?.[1] ?? -1);
    const images = inputs.filter((input) => input.name.startsWith(IMAGES_GROUP))
        .sort((a, b) => socketIndex(a) - socketIndex(b));
    const others = inputs.filter((input) => !input.name.startsWith(IMAGES_GROUP));
    const ordered = [...others.slice(0, first), ...images, ...others.slice(first)];
    if (ordered.every((input, slot) => input === inputs[slot])) return;
    inputs.splice(0, inputs.length, ...ordered);
    const links = node.graph?.links;
    ordered.forEach((input, slot) => {
        const link = input.link == null ? null : links?.get?.(input.link) ?? links?.[input.link];
        if (link) link.target_slot = slot;
    });
}

/** A socket restored by configure() (workflow load, paste, clone, Alt+drag) comes with the label and colour it was
 * saved or copied with: ours from that moment ("image0 → <i>₁", "image1 (bypassed, skipped)"), wrong for a copy
 * pasted alone or a workflow edited since. Put back what the frontend gives a new socket (the Autogrow's label
 * "image0", no colour of its own) until refresh() computes ours in the next frame. In the classic canvas that
 * frame is all it would show; frontend 1.47.12's Vue nodes read a socket's label when the node's component mounts
 * (after configure, before that refresh) and not when it changes: they showed the stale label (a copy pasted alone:
 * "image0 → <i>₁" on its empty socket) until something else redrew the node's slots. */
function resetImageSocketLabels(node) {
    for (const input of node.inputs || []) {
        if (!input.name.startsWith(IMAGES_GROUP)) continue;
        input.label = input.name.slice(IMAGES_GROUP.length);
        input.color_on = undefined;
    }
}

/** Keep one spare empty image socket after the last connected one, as the Autogrow input does while the user
 * connects and disconnects: a copy pasted, cloned or Alt+dragged without its links comes back with every socket
 * the original had (image0..image3 for three images), all empty. Only from onAfterGraphConfigured, which the
 * frontend calls on every node once a paste has made its links, or a workflow load has restored them: in
 * configure() a pasted copy has no links yet (they are made after it), so a trim there would drop the sockets
 * a paste with connections (Ctrl+Shift+V) is about to use. Empty sockets between connected ones stay. */
function dropSpareImageSockets(node) {
    const slots = (node.inputs || []).map((input, slot) => (input.name.startsWith(IMAGES_GROUP) ? slot : -1))
        .filter((slot) => slot !== -1);
    const lastLinked = slots.findLastIndex((slot) => node.isInputConnected(slot));
    const spare = slots.slice(lastLinked + 2);
    if (spare.length === 0) return;
    for (const slot of spare.reverse()) node.removeInput(slot);
    node.setSize?.([node.size[0], node.computeSize?.()[1] ?? node.size[1]]);  // shrink, as the Autogrow input does
}

/** Coalesce bursts (typing, Autogrow adding/removing sockets in the next frame) into one refresh. */
function scheduleRefresh(node) {
    if (node.kosmosgRefreshPending) return;
    node.kosmosgRefreshPending = true;
    requestAnimationFrame(() => {
        node.kosmosgRefreshPending = false;
        refresh(node);
    });
}

const watchedGraphs = new WeakSet();

/** Refresh the prompt nodes as soon as a node anywhere in the workflow changes mode (Ctrl+B / Ctrl+M, the
 * context menu, the selection toolbox, the properties panel, a script: all just assign node.mode) or title. The
 * loader is not our node, so none of our node's callbacks fire; the frontend (1.47 on) instruments node.mode
 * and reports every assignment as the graph event "node:property:changed". graph.events is an EventTarget,
 * so listening leaves the graph.onTrigger handlers the frontend chains (minimap, error clearing) alone.
 * One listener per graph: a subgraph has its own events, and a node there may feed a prompt node outside it
 * (through the subgraph node's output) or inside it; every prompt node is refreshed (cheap). */
function watchGraphs() {
    for (const graph of workflowGraphs()) {
        if (!graph?.events?.addEventListener || watchedGraphs.has(graph)) continue;
        watchedGraphs.add(graph);
        graph.events.addEventListener("node:property:changed", (event) => {
            if (event.detail?.property === "mode" || event.detail?.property === "title") onGraphChanged();
        });
    }
}

/** The workflow's root graph and all its subgraphs (the root graph keeps every subgraph, nested ones too). */
function workflowGraphs() {
    const root = app.rootGraph ?? app.graph;
    return root ? [root, ...(root.subgraphs?.values?.() ?? [])] : [];
}

/** Every prompt node of the workflow, subgraphs included. */
function allPromptNodes() {
    return workflowGraphs().flatMap((graph) => (graph.nodes ?? []).filter((node) => node.type === NODE_ID));
}

/** After any user edit that changed the workflow: the frontend's change tracker compares the graph after each
 * mouse/key action and sends "graphChanged" when it differs. This catches what no event of the graph reports:
 * a link made or removed upstream (a bypassed node's own input, a Reroute's input), which changes whether
 * our socket's image arrives, while nothing touches our node. */
function onGraphChanged() {
    for (const node of allPromptNodes()) scheduleRefresh(node);
}

function chain(original, extra) {
    return function (...args) {
        const result = original?.apply(this, args);
        extra.apply(this, args);
        return result;
    };
}

function addStatusWidget(node) {
    const container = document.createElement("div");
    container.className = "kosmosg-status";
    container.dataset.testid = "kosmosg-status";
    Object.assign(container.style, {
        font: "11px monospace", padding: "4px 6px", boxSizing: "border-box", overflow: "auto",
        background: "rgba(0,0,0,0.25)", borderRadius: "6px", lineHeight: "1.35", whiteSpace: "pre-wrap",
        wordBreak: "break-word", color: "var(--input-text, #ddd)",
    });
    const status = document.createElement("div");
    status.dataset.testid = "kosmosg-status-summary";
    status.style.fontWeight = "bold";
    const preview = document.createElement("div");
    preview.dataset.testid = "kosmosg-status-preview";
    preview.style.opacity = "0.9";
    container.append(status, preview);
    const widget = node.addDOMWidget(STATUS_WIDGET, "kosmosg_status", container, {
        serialize: false,           // display only: never in widgets_values nor in the API prompt
        hideOnZoom: false,
        getValue: () => "",
        setValue: () => {},
        getMinHeight: () => 64,
        getMaxHeight: () => 140,
    });
    widget.serialize = false;
    widget.kosmosgElements = { status, preview };
    return widget;
}

const EXTENSION_NAME = "KosmosG.interleavedPrompt";

// The frontend refuses a second extension with the same name (it throws). That happens when
// the same file is served twice, e.g. when both WEB_DIRECTORY and pyproject's [tool.comfy] web
// register the folder: keep the first registration, skip quietly.
if (app.extensions?.some?.((extension) => extension.name === EXTENSION_NAME)) {
    console.debug(`${EXTENSION_NAME}: already registered (file loaded twice); skipping`);
} else app.registerExtension({
    name: EXTENSION_NAME,

    setup() {
        api.addEventListener?.("graphChanged", onGraphChanged);
    },

    // The only hook that sees the node class before instances exist: extend its prototype
    // callbacks once, for our node only.
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData?.name !== NODE_ID) return;

        // New node (menu, search, paste, or a workflow being loaded): add the status line and
        // follow edits of the two text widgets. Their `callback` fires on every keystroke
        // (the multiline textarea calls it from its input event), so the check is live.
        nodeType.prototype.onNodeCreated = chain(nodeType.prototype.onNodeCreated, function () {
            addStatusWidget(this);
            // room for the status line and a two-line preview without squeezing the textarea
            const [width, height] = this.computeSize?.() ?? this.size;
            this.setSize?.([Math.max(this.size[0], width, MIN_WIDTH), Math.max(this.size[1], height)]);
            for (const name of ["text", "weights"]) {
                const widget = this.widgets?.find((w) => w.name === name);
                if (widget) widget.callback = chain(widget.callback, () => scheduleRefresh(this));
            }
            scheduleRefresh(this);
        });

        // Links made or removed: the Autogrow input adds/removes sockets in this same callback
        // chain (and partly in the next frame), so refresh after it settles.
        nodeType.prototype.onConnectionsChange = chain(nodeType.prototype.onConnectionsChange, function () {
            scheduleRefresh(this);
        });

        // Loaded from a workflow, pasted or cloned: widget values and links are set without widget
        // callbacks, the sockets may come back out of order and with the labels they were saved with.
        nodeType.prototype.onConfigure = chain(nodeType.prototype.onConfigure, function () {
            resetImageSocketLabels(this);
            keepImageSocketsInOrder(this);
            scheduleRefresh(this);
        });

        // A paste, clone or Alt+drag has made its links, or a workflow load restored them: now the sockets
        // a copy without links does not need can go.
        nodeType.prototype.onAfterGraphConfigured = chain(nodeType.prototype.onAfterGraphConfigured, function () {
            dropSpareImageSockets(this);
            scheduleRefresh(this);
        });
    },
});
