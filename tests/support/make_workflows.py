"""Generate the shipped UI-format workflows in workflows/ (run after changing a graph):

    python tests/support/make_workflows.py [--out workflows]    # the test environment's python (numpy, torch)

The JSON is what the ComfyUI frontend saves (nodes with sockets + link table + widgets_values),
so users drag it onto the canvas and the template browser lists it. The integration test checks
every file against the real server's /object_info and runs it, so a drift fails CI.

Placeholder model names (README says where each file goes):
    SD15_CHECKPOINT  models/checkpoints  any SD1.5 checkpoint
    KOSMOSG_CHECKPOINT models/kosmosg    the official weights converted to .safetensors
    OFFICIAL_CHECKPOINT models/kosmosg   the official checkpoint_final.pt itself (the demo workflow: its encoder and
                                         its stored SD1.5 U-Net and VAE)
    CONTROLNET       models/controlnet   an SD1.5 canny ControlNet
    LORA             models/loras        any SD1.5 LoRA
The out-of-the-box workflow uses the built-in nano models instead, and the two subject images
that tests/support/nano_ootb.py makes from the nano world; this command also (re)writes them into
<out>/input/ (same pixels every run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "tests")) if p not in sys.path]  # run as a script
from support import nano_ootb  # noqa: E402

SD15_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
KOSMOSG_CHECKPOINT = "kosmosg.safetensors"
OFFICIAL_CHECKPOINT = "checkpoint_final.pt"
CONTROLNET = "control_v11p_sd15_canny.safetensors"
LORA = "sd15-style-lora.safetensors"
LORA_TRIGGER_WORDS = "watercolor style"  # stands for the LoRA's own trigger words
NANO_SD15 = "nano-sd15.safetensors"
NANO_KOSMOSG = "kosmosg-nano.safetensors"
EARLIER_VERSIONS = REPO / "scripts" / "earlier_workflow_versions.json"  # read by scripts/start_comfyui.py
SUBJECT_1 = "kosmosg_subject_1.png"
SUBJECT_2 = "kosmosg_subject_2.png"
NEGATIVE = ""  # official demo: empty negative prompt = the unconditional encoding
# train.eval nano's sampler defaults (20 steps, guidance 5, DDIM eta 0) as ComfyUI settings: see NANO_NOTE
NANO_STEPS, NANO_CFG, NANO_SAMPLER, NANO_SCHEDULER = 20, 5.0, "euler", "normal"

# Socket inputs (links, not widgets) and outputs of each node type used: (name, type).
SPECS = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "KosmosGCheckpointSD15": ([], [("MODEL", "MODEL"), ("VAE", "VAE")]),
    "KosmosGLoader": ([], [("kosmosg_model", "KOSMOSG_MODEL")]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "KosmosGInterleavedPrompt": (None, [("kosmosg_prompt", "KOSMOSG_PROMPT")]),  # sockets: images.imageN
    "KosmosGEncode": ([("model", "KOSMOSG_MODEL"), ("prompt", "KOSMOSG_PROMPT")],
                      [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "KosmosGOfficialSampler": ([("model", "MODEL")], [("sampler", "SAMPLER"), ("sigmas", "SIGMAS")]),
    "SamplerCustom": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                       ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
                      [("output", "LATENT"), ("denoised_output", "LATENT")]),
    "KosmosGOfficialNoise": ([], [("noise", "NOISE")]),
    "CFGGuider": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
                  [("GUIDER", "GUIDER")]),
    "SamplerCustomAdvanced": ([("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"),
                               ("latent_image", "LATENT")], [("output", "LATENT"), ("denoised_output", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], [("IMAGE", "IMAGE")]),  # 0.30: passes its images through
    "ControlNetLoader": ([], [("CONTROL_NET", "CONTROL_NET")]),
    "Canny": ([("image", "IMAGE")], [("IMAGE", "IMAGE")]),
    "ControlNetApplyAdvanced": ([("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                 ("control_net", "CONTROL_NET"), ("image", "IMAGE"), ("vae", "VAE")],
                                [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
    "LoraLoader": ([("model", "MODEL"), ("clip", "CLIP")], [("MODEL", "MODEL"), ("CLIP", "CLIP")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "ConditioningConcat": ([("conditioning_to", "CONDITIONING"), ("conditioning_from", "CONDITIONING")],
                           [("CONDITIONING", "CONDITIONING")]),
    "MarkdownNote": ([], []),
}

# Layout, in graph units (what "pos" and "size" are in). The frontend draws a node's title bar (TITLE high) above its
# "pos": the node's box is that bar + its "size". In the Vue nodes mode ("Nodes 2.0", the setting
# Comfy.VueNodes.Enabled) a node is a component at least that big that grows to fit its widgets, taller than the
# classic canvas draws it (frontends 1.47.12 and 1.58.1: the Kosmos-G Loader 142 high there, 106 on the canvas; a Load
# Image 322, 314 on the canvas), so SIZES are the Vue heights with a little to spare and the same box in both modes.
# GAP separates two boxes, in a column and between columns. tests/browser/layout_check.mjs loads every workflow in both
# modes and fails when two nodes overlap or nearly touch. The graphs stay compact: a workflow at 0.75 fits a 1920 x 1080
# window, and the README's screenshots (1400 x 800) keep a scale at which the canvas still draws the nodes' text.
TITLE, GAP, SLOT = 30, 50, 20  # SLOT: the canvas's distance between two sockets of a node
SIZES = {
    "CheckpointLoaderSimple": (320, 110),
    "KosmosGCheckpointSD15": (320, 90),
    "KosmosGLoader": (320, 150),
    "LoadImage": (320, 330),
    "KosmosGInterleavedPrompt": (380, 260),  # up to two images (three sockets); more make it taller
    "KosmosGEncode": (320, 190),
    "EmptyLatentImage": (320, 130),
    "KSampler": (320, 280),
    "KosmosGOfficialSampler": (320, 140),
    "SamplerCustom": (320, 300),
    "KosmosGOfficialNoise": (320, 140),
    "CFGGuider": (320, 140),
    "SamplerCustomAdvanced": (320, 180),
    "VAEDecode": (240, 60),
    "SaveImage": (380, 420),
    "ControlNetLoader": (320, 70),
    "Canny": (320, 100),
    "ControlNetApplyAdvanced": (320, 210),
    "LoraLoader": (320, 150),
    "CLIPTextEncode": (320, 170),
    "ConditioningConcat": (320, 80),
}
VIEW_SCALE, VIEW_MARGIN = 0.75, 120  # the view a loaded workflow opens with: its top-left corner clear of the menus


class Workflow:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, kind: str, widgets: list, pos: tuple[int, int], size: tuple[int, int] | None = None,
            images: int = 0, title: str | None = None) -> dict:
        sockets, outputs = SPECS[kind]
        size = size or SIZES[kind]
        if sockets is None:  # the prompt node: connected image sockets + one empty (as the UI shows)
            sockets = [(f"images.image{i}", "IMAGE") for i in range(images + 1)]
        node = {
            "id": len(self.nodes) + 1, "type": kind, "pos": list(pos), "size": list(size), "flags": {},
            "order": len(self.nodes), "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in sockets],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": kind}, "widgets_values": list(widgets),
        }
        for socket in node["inputs"]:
            if socket["name"].startswith("images."):
                socket["label"] = socket["name"].split(".", 1)[1]
                socket["shape"] = 7  # optional socket (hollow dot), as the frontend saves autogrow slots
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def link(self, src: dict, src_slot: int, dst: dict, dst_name: str) -> None:
        link_id = len(self.links) + 1
        dst_index = next(i for i, s in enumerate(dst["inputs"]) if s["name"] == dst_name)
        kind = src["outputs"][src_slot]["type"]
        self.links.append([link_id, src["id"], src_slot, dst["id"], dst_index, kind])
        src["outputs"][src_slot]["links"].append(link_id)
        dst["inputs"][dst_index]["link"] = link_id

    def to_json(self) -> dict:
        # open with the top-left corner of the graph (the note's title bar) in view
        left = min(n["pos"][0] for n in self.nodes)
        top = min(n["pos"][1] - TITLE for n in self.nodes)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"kosmosg-workflow/{self.name}")),
            "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"ds": {"scale": VIEW_SCALE, "offset": [VIEW_MARGIN - left, VIEW_MARGIN - top]}}, "version": 0.4,
        }


def below(node: dict) -> int:
    """The "pos" y of a node placed under `node` in its column."""
    return node["pos"][1] + node["size"][1] + GAP + TITLE


def subject_graph(name: str, text: str, subjects: list[str], note: str, sd_checkpoint=SD15_CHECKPOINT,
                  kosmosg_checkpoint=KOSMOSG_CHECKPOINT, size=512, steps=50, cfg=6.0,
                  ksampler: tuple[str, str] | None = None, demo_noise=False, batch=1, seed=42, kosmosg_dtype="auto",
                  controlnet=False, lora=False, sd15_from_kosmosg=False, note_height=220) -> Workflow:
    """Loader + prompt + encode -> (ControlNet) -> sampling -> save. With `sd15_from_kosmosg`, the SD1.5 U-Net and VAE
    come from the Kosmos-G checkpoint (Kosmos-G SD1.5 From Checkpoint) instead of an SD1.5 checkpoint (no CLIP: no
    LoRA, no ControlNet then). Sampling: the official demo's sampler (Kosmos-G
    Official Sampler into SamplerCustom; 50 steps, cfg 6); with `demo_noise`, the demo's starting noise too (Kosmos-G
    Official Noise and a CFGGuider into SamplerCustomAdvanced); or KSampler with `ksampler` = (sampler, scheduler).
    The flow runs left to right, a column each (the note above the first two): subject images (+ the ControlNet's
    edge image) | Kosmos-G Loader, prompt (edge detection) | SD checkpoint, encode, latent (ControlNet loader) |
    (LoRA) | (Apply ControlNet) | (CFGGuider, Official Noise) | (Official Sampler above) SamplerCustom(Advanced) or
    KSampler | decode, save. A node's inputs come from the columns to its left (Save Image's from VAE Decode above
    it, the sampler's sampler and sigmas from the Official Sampler above it); a long link may pass behind a node
    between (the SD checkpoint's VAE behind the LoRA loader)."""
    wf = Workflow(name)
    widest = {"images": "LoadImage", "prompt": "KosmosGInterleavedPrompt", "encode": "KosmosGEncode",
              "lora": "LoraLoader", "controlnet": "ControlNetApplyAdvanced", "guide": "CFGGuider",
              "sampler": "KSampler", "output": "SaveImage"}  # each column's widest node
    columns = ["images", "prompt", "encode", *(["lora"] if lora else []), *(["controlnet"] if controlnet else []),
               *(["guide"] if demo_noise else []), "sampler", "output"]
    x, left = 20, {}
    for column in columns:
        left[column] = x
        x += SIZES[widest[column]][0] + GAP
    top = 20
    wf.add("MarkdownNote", [note], (left["images"], top - TITLE - GAP - note_height), size=(700, note_height))
    if sd15_from_kosmosg:
        ckpt, vae_slot = wf.add("KosmosGCheckpointSD15", [kosmosg_checkpoint], (left["encode"], top)), 1
    else:
        ckpt, vae_slot = wf.add("CheckpointLoaderSimple", [sd_checkpoint], (left["encode"], top)), 2
    loader = wf.add("KosmosGLoader", [kosmosg_checkpoint, kosmosg_dtype, "auto"], (left["prompt"], top))
    images, y = [], top
    for subject in subjects:
        images.append(wf.add("LoadImage", [subject, "image"], (left["images"], y)))
        y = below(images[-1])
    prompt = wf.add("KosmosGInterleavedPrompt", [text, ""], (left["prompt"], below(loader)), images=len(subjects))
    encode = wf.add("KosmosGEncode", [NEGATIVE, True], (left["encode"], below(ckpt)))
    latent = wf.add("EmptyLatentImage", [size, size, batch], (left["encode"], below(encode)))
    if ksampler is None:
        schedule = wf.add("KosmosGOfficialSampler", [steps, "dpm"], (left["sampler"], top))
        if demo_noise:
            guider = wf.add("CFGGuider", [cfg], (left["guide"], top))
            noise = wf.add("KosmosGOfficialNoise", [seed, "fixed", "fp16"], (left["guide"], below(guider)))
            sampler = wf.add("SamplerCustomAdvanced", [], (left["sampler"], below(schedule)))
        else:
            sampler = wf.add("SamplerCustom", [True, seed, "fixed", cfg], (left["sampler"], below(schedule)))
    else:
        sampler = wf.add("KSampler", [seed, "fixed", steps, cfg, *ksampler, 1.0], (left["sampler"], encode["pos"][1]))
    decode = wf.add("VAEDecode", [], (left["output"], top))
    save = wf.add("SaveImage", ["kosmosg"], (left["output"], below(decode)))
    wf.link(loader, 0, encode, "model")
    for i, image in enumerate(images):
        wf.link(image, 0, prompt, f"images.image{i}")
    wf.link(prompt, 0, encode, "prompt")
    model_source, model_slot = ckpt, 0
    positive, negative = (encode, 0), (encode, 1)
    if lora:  # the LoRA patches the U-Net and CLIP; its trigger words, CLIP-encoded, are appended to Kosmos-G's tokens
        lora_node = wf.add("LoraLoader", [LORA, 0.8, 0.8], (left["lora"], top))
        trigger = wf.add("CLIPTextEncode", [LORA_TRIGGER_WORDS], (left["lora"], below(lora_node)))
        concat = wf.add("ConditioningConcat", [], (left["lora"], below(trigger)))
        wf.link(ckpt, 0, lora_node, "model")
        wf.link(ckpt, 1, lora_node, "clip")
        wf.link(lora_node, 1, trigger, "clip")
        wf.link(encode, 0, concat, "conditioning_to")
        wf.link(trigger, 0, concat, "conditioning_from")
        model_source, model_slot = lora_node, 0
        positive = (concat, 0)
    if controlnet:
        cn_loader = wf.add("ControlNetLoader", [CONTROLNET], (left["encode"], below(latent)))
        hint = wf.add("LoadImage", [SUBJECT_2, "image"], (left["images"], y), title="Load Image (edges from)")
        canny = wf.add("Canny", [0.4, 0.8], (left["prompt"], below(prompt)))
        # the edges run straight into Apply's 4th input, between Empty Latent Image and the ControlNet loader
        apply = wf.add("ControlNetApplyAdvanced", [0.8, 0.0, 1.0], (left["controlnet"], canny["pos"][1] - 3 * SLOT))
        wf.link(hint, 0, canny, "image")
        wf.link(positive[0], positive[1], apply, "positive")
        wf.link(negative[0], negative[1], apply, "negative")
        wf.link(cn_loader, 0, apply, "control_net")
        wf.link(canny, 0, apply, "image")
        wf.link(ckpt, vae_slot, apply, "vae")
        positive, negative = (apply, 0), (apply, 1)
    conditioned = guider if demo_noise else sampler  # what takes the model and the conditionings
    wf.link(model_source, model_slot, conditioned, "model")
    if ksampler is None:
        wf.link(model_source, model_slot, schedule, "model")
        wf.link(schedule, 0, sampler, "sampler")
        wf.link(schedule, 1, sampler, "sigmas")
    wf.link(positive[0], positive[1], conditioned, "positive")
    wf.link(negative[0], negative[1], conditioned, "negative")
    if demo_noise:
        wf.link(noise, 0, sampler, "noise")
        wf.link(guider, 0, sampler, "guider")
    wf.link(latent, 0, sampler, "latent_image")
    wf.link(sampler, 0, decode, "samples")
    wf.link(ckpt, vae_slot, decode, "vae")
    wf.link(decode, 0, save, "images")
    return wf


MODELS_NOTE = (f"**Models**: an SD1.5 checkpoint in `models/checkpoints` (here `{SD15_CHECKPOINT}`), the Kosmos-G "
               f"checkpoint in `models/kosmosg` (here `{KOSMOSG_CHECKPOINT}`; convert the official "
               "`checkpoint_final.pt` with *Kosmos-G Convert Checkpoint*). Subject images go in `input/`. "
               "Pick your own files in the loaders if the names differ.")
SAMPLER_NOTE = ("\n\n**Sampler** = the official demo's, step for step: *Kosmos-G Official Sampler* (DPM-Solver, 50 "
                "steps) into *SamplerCustom* (CFG 6). A KSampler with `dpmpp_2m` + `normal` works too, close to it.")
DEMO_NOTE = (
    "# Kosmos-G: the official demo, step for step\nThe official Gradio demo's settings: 512 px, 4 images, seed 0 "
    "(its *Randomize seed* unticked), the model in fp16 (*Kosmos-G Loader*), DPM-Solver with 50 steps (*Kosmos-G "
    "Official Sampler*), guidance 6 (*CFGGuider*), the unconditional negative, and its starting noise (*Kosmos-G "
    "Official Noise*: fp16, drawn on the GPU); picture k is batch row k. On an NVIDIA GPU that holds as many threads "
    "as the latent has numbers (65,536 for 4 images at 512 px; 16,384 for one, which nearly any GPU holds), a seed "
    "starts where the demo's does; elsewhere the numbers differ (the log says so). The sampling is the demo's either "
    "way. ")
DEMO_MODELS_NOTE = (
    f"**Models**: the official Kosmos-G checkpoint alone, in `models/kosmosg` (here `{OFFICIAL_CHECKPOINT}`, with "
    "its tokenizer's `sentencepiece.bpe.model` and `dict.txt` in a `data/` folder beside it): *Kosmos-G Loader* reads "
    "the encoder from it and *Kosmos-G SD1.5 From Checkpoint* the SD1.5 U-Net and VAE it stores, the networks the "
    "demo samples with. Subject images go in `input/`. Pick your own files in the loaders if the names differ.")


_FIRST, _SECOND = nano_ootb.SUBJECTS
NANO_NOTE = (
    "# Kosmos-G nano: runs out of the box\n"
    f"Uses the pack's built-in small models (`models/nano`: `{NANO_SD15}`, `{NANO_KOSMOSG}`). They know only a "
    "toy world of 64x64 scenes: one or two subjects (red, orange, yellow, green, blue or purple; circle, square, "
    "triangle or cross) on the left, in the centre or on the right, on grey, white, black or beige. The first "
    f"`<i>` is `{_FIRST.file}` (a {_FIRST.colour} {_FIRST.shape}), the second `{_SECOND.file}` (a "
    f"{_SECOND.colour} {_SECOND.shape}): subjects cut from held-out scenes, on white. Write prompts in the "
    "training data's wording, `<i>` in place of the subject words: `a <i> on the left and a <i> on the right, "
    "on grey` (`an <i>` for orange).\n\n"
    f"**Sampler** = the project's nano evaluation (`python -m train.eval nano`): {NANO_STEPS} steps, CFG "
    f"{NANO_CFG:g}, DDIM without noise. That is `{NANO_SAMPLER}` + `{NANO_SCHEDULER}` here: the DDIM step is "
    f"the Euler step (ComfyUI's own `ddim` sampler runs `euler`), and `{NANO_SCHEDULER}` spaces the "
    f"{NANO_STEPS} timesteps evenly from 999 to 0 as the evaluation does (`ddim_uniform` would use 951 ... 1).\n\n"
    "If the start script says the nano models are random-weight stand-ins, the image is noise. Swap in real "
    "SD1.5 + Kosmos-G checkpoints (and 512 px) for real subjects.")


def all_workflows() -> dict[str, Workflow]:
    return {
        "kosmosg-single-subject": subject_graph(
            "kosmosg-single-subject", "a photo of <i> on the beach", [SUBJECT_1],
            "# Kosmos-G: one subject\nWrite `<i>` where the image goes. " + MODELS_NOTE + SAMPLER_NOTE),
        "kosmosg-two-subjects": subject_graph(
            "kosmosg-two-subjects", "<i> and <i> sitting together in a garden", [SUBJECT_1, SUBJECT_2],
            "# Kosmos-G: two subjects\nThe first `<i>` is image0, the second image1 (a new socket appears "
            "when you connect the last one). Optional per-image weights: e.g. `1.0, 0.8`. " + MODELS_NOTE + SAMPLER_NOTE),
        "kosmosg-image-editing": subject_graph(
            "kosmosg-image-editing", "<i> wearing a red hat, in the snow", [SUBJECT_1],
            "# Kosmos-G: editing by instruction\nDescribe the change around the image: `<i> wearing a red hat`. "
            + MODELS_NOTE + SAMPLER_NOTE),
        "kosmosg-controlnet": subject_graph(
            "kosmosg-controlnet", "a photo of <i> in a forest", [SUBJECT_1],
            "# Kosmos-G + ControlNet\nKosmos-G conditioning goes through *Apply ControlNet* like CLIP text. "
            f"Canny ControlNet for SD1.5 in `models/controlnet` (here `{CONTROLNET}`). " + MODELS_NOTE + SAMPLER_NOTE,
            controlnet=True),
        "kosmosg-lora": subject_graph(
            "kosmosg-lora", "a photo of <i>, watercolor painting", [SUBJECT_1],
            "# Kosmos-G + LoRA\nThe LoRA patches the U-Net and CLIP (*Load LoRA*; the SD1.5 checkpoint must hold its "
            "CLIP). Kosmos-G writes the prompt's conditioning, so a LoRA's trigger words go in *CLIP Text Encode* "
            "(here `" + LORA_TRIGGER_WORDS + "`): *Conditioning (Concat)* appends their 77-token CLIP chunk after "
            "Kosmos-G's 77 tokens, and the U-Net reads both, as it reads the chunks of a long prompt. Without trigger "
            "words, drop the two nodes: even an empty chunk changes the picture. With a batch of images on one socket, "
            "concatenation needs a batch of texts too: combine instead. SD1.5 LoRA in "
            f"`models/loras` (here `{LORA}`). " + MODELS_NOTE + SAMPLER_NOTE, lora=True, note_height=280),
        "kosmosg-official-demo": subject_graph(
            "kosmosg-official-demo", "<i> and <i> sitting together in a garden", [SUBJECT_1, SUBJECT_2],
            DEMO_NOTE + DEMO_MODELS_NOTE, kosmosg_checkpoint=OFFICIAL_CHECKPOINT, sd15_from_kosmosg=True,
            demo_noise=True, batch=4, seed=0, kosmosg_dtype="fp16", note_height=240),
        "kosmosg-nano-out-of-the-box": subject_graph(
            "kosmosg-nano-out-of-the-box", nano_ootb.PROMPT, [s.file for s in nano_ootb.SUBJECTS], NANO_NOTE,
            sd_checkpoint=NANO_SD15, kosmosg_checkpoint=NANO_KOSMOSG, size=nano_ootb.IMAGE_PX, steps=NANO_STEPS,
            cfg=NANO_CFG, ksampler=(NANO_SAMPLER, NANO_SCHEDULER), note_height=360),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the shipped UI-format workflows.")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "workflows"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for path in nano_ootb.write_subject_images(os.path.join(args.out, "input")):
        print(path)
    for name, wf in all_workflows().items():
        path = os.path.join(args.out, name + ".json")
        text = json.dumps(wf.to_json(), indent=2) + "\n"
        if os.path.isfile(path):
            remember_earlier_version(path, text)
        with open(path, "w") as f:
            f.write(text)
        print(path)


def remember_earlier_version(path: str, new_text: str) -> None:
    """Before the shipped workflow at `path` is replaced by `new_text`: its SHA-256 into EARLIER_VERSIONS, so the
    start script updates a user's unedited copy of it (scripts/start_comfyui.py copy_examples)."""
    with open(path, "rb") as f:
        old = f.read()
    if old == new_text.encode():
        return
    with open(EARLIER_VERSIONS) as f:
        earlier = json.load(f)
    known = earlier.setdefault(os.path.basename(path), [])
    digest = hashlib.sha256(old).hexdigest()
    if digest not in known:
        known.append(digest)
        known.sort()
    with open(EARLIER_VERSIONS, "w") as f:
        f.write(json.dumps(earlier, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
