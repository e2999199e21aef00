"""How far PyTorch's own bfloat16 run of the tiny SD2.1 models lands from the float32 references in
tests/fixtures/tiny-sd21-reference.safetensors: the scale of the bf16 tolerances in
tests/kernel_cases (the CUDA backend computes in bf16). Prints one line a model output; writes
nothing.

    $STEER_REF_VENV/bin/python tests/reference/bf16_errors.py
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel

MODEL = "tests/fixtures/tiny-sd21"
REF = "tests/fixtures/tiny-sd21-reference.safetensors"
PROMPT = "a photo of a dog to the left of a teddy bear"  # the fixture's metadata `prompt`


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def main() -> None:
    ref = load_file(REF)
    bf = torch.bfloat16
    with torch.no_grad():
        te = CLIPTextModel.from_pretrained(f"{MODEL}/text_encoder", torch_dtype=bf).eval()
        out = te(ref["text.input_ids"]).last_hidden_state
        print(f"text_encoder last_hidden_state: {rel(out, ref['text.last_hidden_state']):.2e}")
        vae = AutoencoderKL.from_pretrained(f"{MODEL}/vae", torch_dtype=bf).eval()
        dec = vae.decode(ref["vae.latent"].to(bf)).sample
        print(f"vae decoded: {rel(dec, ref['vae.decoded']):.2e}")
        enc = vae.encode(ref["vae.image"].to(bf)).latent_dist.mean
        print(f"vae encoded_mean: {rel(enc, ref['vae.encoded_mean']):.2e}")
        unet = UNet2DConditionModel.from_pretrained(f"{MODEL}/unet", torch_dtype=bf).eval()
        o = unet(ref["unet.sample"].to(bf), ref["unet.timestep"],
                 ref["unet.encoder_hidden_states"].to(bf)).sample
        print(f"unet out: {rel(o, ref['unet.out']):.2e}")
        # The 3-step DDIM sampling with guidance 7.5 of sd21_fixtures.py, in bf16 (the latents
        # too, as a bf16 pipeline keeps them).
        pipe = StableDiffusionPipeline.from_pretrained(MODEL, dtype=bf)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        final = pipe(PROMPT, negative_prompt="", guidance_scale=7.5, num_inference_steps=3,
                     eta=0.0, latents=ref["ddim.init_latents"].to(bf), output_type="latent").images
        print(f"ddim final_latents: {rel(final, ref['ddim.final_latents']):.2e}")


if __name__ == "__main__":
    main()
