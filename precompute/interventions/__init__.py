"""Interventions through an SAE spliced into the model: steering, ablation on text, and attribution.

The splice
----------
At the SAE's hook the activation x (raw model space) is replaced by

    x_new = unnorm(decode(z_edit)) + (x - unnorm(decode(z))),     z = encode(x)

i.e. the SAE's reconstruction of the edited latents plus the SAE's error term, so the rest of the model (all
later layers, the final norm, the unembedding and Gemma-2's logit soft-capping: the model's own forward runs to
the logits) sees the edited activation. `unnorm` inverts the SAE's per-token input normalisation with the
statistics of the ORIGINAL x (`SAE.denormalize(y, SAE.norm_stats(x))`): if normalize(x) == (x - shift) / scale then
unnorm(y) = y * scale + shift, with

    none                   scale = 1,                 shift = 0
    constant_norm_rescale  scale = |x| / sqrt(d_in),  shift = 0
    layer_norm             scale = std(x) + 1e-5,     shift = mean(x)

Because decode is affine and b_dec and shift cancel, the splice is applied as the exact equivalent

    x_new = x + scale * (z_edit - z) @ W_dec

so that with no edit (or where an edit changes nothing) x_new is bit-for-bit x. The literal reconstruction-plus-
error form is what attribution differentiates through (`forward_from_latents`); both are tested to agree.

Edits (`Edit`), applied in the order given, at all positions (positions=None) or at chosen absolute positions:
    ablate  z_f := 0                       (latent space; un-normalised as above)
    clamp   z_f := value                   (latent space; un-normalised as above)
    add     x   += value * W_dec[f]        (raw space, like Neuronpedia's SIMPLE_ADDITIVE steering, which adds
                                            strength * decoder row to the hooked activation at every position;
                                            for an SAE without input normalisation this is exactly z_f += value)
    orthogonal  x := (I - P) x + value * P x, P = v v^T / |v|^2   (Neuronpedia's ORTHOGONAL_DECOMP)
    cap     x   += (min(x.u, value) - x.u) u, u = v / |v|          (Neuronpedia's PROJECTION_CAP)
with v = W_dec[f] (or v / |v| with normalize, Neuronpedia's normalize_steering). Strength that changes nothing:
add 0, orthogonal 1, cap above every projection (edits.NEUTRAL_VALUE). strength.py suggests strengths per SAE.

The hook is installed through HookedLM's public hook API (`lm.hooks`, `lm.run_with_hooks`, precompute.models) on the
same modules HookedLM reads, and fires only in the thread that installed it, so a worker serving other requests from
other threads is not affected. Limits: config.LIMITS.

Modules: edits (the edit model and input validation), splice (installing the splice, both forms), ablate (ablation
on text), attribute (attribution), generate (steered generation).
"""

from . import chat, patching, strength
from .ablate import AblationResult, ablation_effects
from .attribute import AttributionResult, FeatureAttribution, LatentGradients, attribute, latent_gradients
from .edits import (EDIT_MODES, NEURONPEDIA_METHODS, NEUTRAL_VALUE, STEER_MODES, Edit, EditMode, PromptLengthError,
                    check_int, check_prompt_length, context_limit, model_positions, prompt_ids, validate_edits,
                    validate_ids, vocab_size)
from .generate import (Continuation, Generation, GenRequest, Sampling, check_n_logprobs, check_sampling, generate,
                       generate_many)
from .splice import EditSplice, LatentSplice, forward_from_latents, hook_of, run_with_edits, splice, spliced_logits

__all__ = ["AblationResult", "ablation_effects", "AttributionResult", "FeatureAttribution", "LatentGradients",
           "attribute", "latent_gradients", "EDIT_MODES", "NEURONPEDIA_METHODS", "NEUTRAL_VALUE", "STEER_MODES", "Edit",
           "EditMode", "PromptLengthError", "check_int", "check_prompt_length", "context_limit", "model_positions",
           "prompt_ids", "validate_edits", "validate_ids", "vocab_size", "Continuation", "Generation", "Sampling",
           "check_n_logprobs", "check_sampling", "generate", "generate_many", "GenRequest", "EditSplice", "LatentSplice", "forward_from_latents",
           "hook_of", "run_with_edits", "splice", "spliced_logits", "chat", "patching", "strength"]
