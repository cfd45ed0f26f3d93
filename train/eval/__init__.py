"""Evaluation for users with real weights (and ideally a GPU): `python -m train.eval SUB-COMMAND ...`.

Sub-commands (each a module with `DESCRIPTION` and `main(argv) -> dict`, registered in
`train.eval.__main__.SUBCOMMANDS`):

- `dreambench`: generate DreamBench images with a pack checkpoint + SD1.5, or score a folder of them:
  DINO, CLIP-I, CLIP-T (see docs/evaluation.md).
- `fid`: Fréchet Inception Distance between a folder of generated and a folder of real images.
- `generate-coco`: text-only generation from COCO captions with the official FID settings.

Every model (SD1.5, DINO, CLIP, Inception) is given by a local path; nothing is downloaded.
"""
