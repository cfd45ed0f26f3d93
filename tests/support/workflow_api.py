"""UI-format workflow (what the ComfyUI frontend saves: nodes + links) -> API-format prompt.

Mirrors the frontend's `app.graphToPrompt()` for the node kinds our shipped workflows use, driven
by the server's `/object_info` so widget order comes from the real node definitions:
- widget inputs (INT/FLOAT/STRING/BOOLEAN/COMBO) consume `widgets_values` in definition order;
  a seed with `control_after_generate` and a COMBO with `image_upload` each own one extra value;
- an input whose socket is linked takes `[source node id, source slot]` instead;
- dynamic sockets (V3 Autogrow, e.g. "images.image0") appear as linked node inputs;
- frontend-only nodes (Note, MarkdownNote) are dropped; muted nodes (mode 2) are dropped.
"""

from __future__ import annotations

import copy

VIRTUAL_NODES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODE_MUTED = 2


def _input_defs(node_def: dict) -> list[tuple[str, object, dict]]:
    out = []
    for section in ("required", "optional"):
        for name, spec in node_def["input"].get(section, {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, kind, options))
    return out


def _is_widget(kind, options: dict) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _extra_widget_values(options: dict) -> int:
    return int(bool(options.get("control_after_generate"))) + int(bool(options.get("image_upload")))


def widget_names(node_def: dict) -> list[str]:
    """Widget input names in `widgets_values` order, with None for the frontend's extra values."""
    names = []
    for name, kind, options in _input_defs(node_def):
        if _is_widget(kind, options):
            names.append(name)
            names.extend([None] * _extra_widget_values(options))
    return names


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in workflow["links"]}  # [id, src node, src slot, dst node, dst slot, type]
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in VIRTUAL_NODES or node.get("mode", 0) == MODE_MUTED:
            continue
        if kind not in object_info:
            raise KeyError(f"node {node['id']}: type {kind!r} is not installed on the server")
        if node.get("mode", 0) != 0:
            raise NotImplementedError(f"node {node['id']}: mode {node['mode']} (bypass) is not supported")
        node_def = object_info[kind]
        linked = {}
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                link = links[socket["link"]]
                linked[socket["name"]] = [str(link[1]), link[2]]
        names = widget_names(node_def)
        values = list(node.get("widgets_values") or [])
        if len(values) != len(names):
            raise ValueError(f"node {node['id']} ({kind}): {len(values)} widget values for widgets {names}")
        inputs = {name: value for name, value in zip(names, values) if name is not None}
        inputs.update(linked)
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt


def substitute(prompt: dict, replacements: dict[tuple[str, str], object]) -> dict:
    """Copy of `prompt` with {(class_type, input name): value} applied to every matching node."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        for (class_type, name), value in replacements.items():
            if node["class_type"] == class_type and name in node["inputs"]:
                node["inputs"][name] = value
    return prompt


def schema_problems(workflow: dict, object_info: dict) -> list[str]:
    """Differences between a UI workflow's saved sockets and the server's node definitions
    (what would show as missing nodes / broken links when a user opens the file)."""
    problems = []
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in VIRTUAL_NODES:
            continue
        if kind not in object_info:
            problems.append(f"node {node['id']}: unknown type {kind}")
            continue
        node_def = object_info[kind]
        declared = {name: (kind_, options) for name, kind_, options in _input_defs(node_def)}
        for socket in node.get("inputs", []):
            name = socket["name"]
            group, _, member = name.partition(".")
            if member and declared.get(group, (None,))[0] == "COMFY_AUTOGROW_V3":
                template = declared[group][1]["template"]
                allowed = [spec[0] for section in template["input"].values() for spec in section.values()]
                ok = member.startswith(template.get("prefix", "")) and socket["type"] in allowed
            else:
                ok = name in declared and (declared[name][0] == socket["type"] or socket.get("widget"))
            if not ok:
                problems.append(f"node {node['id']} ({kind}): input {name}:{socket['type']} not in the definition")
        saved_outputs = [o["type"] for o in node.get("outputs", [])]
        if saved_outputs != list(node_def["output"]):
            problems.append(f"node {node['id']} ({kind}): outputs {saved_outputs} != {node_def['output']}")
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        nodes = {n["id"]: n for n in workflow["nodes"]}
        if nodes[src]["outputs"][src_slot]["type"] != kind or nodes[dst]["inputs"][dst_slot]["type"] != kind:
            problems.append(f"link {link_id}: type {kind} does not match its sockets")
    return problems
