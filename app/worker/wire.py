"""The model worker's wire format: pydantic models shared by the worker and its client (JSON, never pickle)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from ..settings import WORKER

MAX_TEXT_CHARS = WORKER.max_text_chars


class TextIn(BaseModel):
    sae_id: str = Field(description="which SAE to encode with (see /health for the list)")
    text: str = Field("", max_length=MAX_TEXT_CHARS, description="the prompt; BOS is prepended when the SAE expects it")
    ids: list[int] | None = Field(None, description="token ids to use verbatim instead of text (e.g. a stored context)")


class TokenizeIn(BaseModel):
    sae_id: str = Field(description="SAE whose model and BOS convention to use")
    text: str = Field(max_length=MAX_TEXT_CHARS, description="text to tokenize")


class TokenizeOut(BaseModel):
    tokens: list[str] = Field(description="display string of every token, BOS included when prepended")
    ids: list[int] = Field(description="token ids")


class FeatureActsIn(TextIn):
    feature: int = Field(ge=0, description="feature index")


class FeatureActsOut(BaseModel):
    tokens: list[str] = Field(description="display strings of the prompt's tokens")
    values: list[float] = Field(description="the feature's activation on each token (0 on special tokens)")
    max_value: float = Field(description="largest value")
    max_pos: int = Field(description="position of the largest value (first if tied)")


class FeatureHit(BaseModel):
    index: int = Field(description="feature index")
    value: float = Field(description="activation (max over the chosen positions)")
    pos: int = Field(description="position where that value occurs")


class TopFeaturesIn(TextIn):
    k: int = Field(WORKER.top_k, ge=1, le=WORKER.max_k, description="how many features")
    positions: list[int] | None = Field(None, description="token positions to rank over; all positions when absent")


class TopFeaturesOut(BaseModel):
    tokens: list[str] = Field(description="display strings of the prompt's tokens")
    features: list[FeatureHit] = Field(description="features ranked by their max activation over the positions")
    token_max: list[float] = Field(description="strongest feature activation at each token")
    token_argmax: list[int] = Field(description="index of the strongest feature at each token (-1 where none fires)")


class TokenFeaturesIn(TextIn):
    k: int = Field(5, ge=1, le=WORKER.max_token_k, description="features per token")


class TokenFeaturesOut(BaseModel):
    tokens: list[str] = Field(description="display strings of the prompt's tokens")
    per_token: list[list[FeatureHit]] = Field(description="for each token, its top-k active features")


class SAEDesc(BaseModel):
    sae_id: str = Field(description="id, as in the store")
    hook: str = Field(description="hook name")
    d_sae: int = Field(description="number of features")


class HealthOut(BaseModel):
    status: Literal["ok"] = Field(description="always ok when the worker answers")
    model: str = Field(description="model path or id")
    device: str = Field(description="cpu or cuda")
    saes: list[SAEDesc] = Field(description="SAEs this worker encodes with")
    queued: int = Field(description="requests waiting for a forward pass")
    max_prompt_tokens: int = Field(description="admission limit on prompt length")
    max_batch: int = Field(description="largest batch per forward pass")
    batches: int = Field(description="forward passes run so far")
    requests: int = Field(description="requests answered so far")
    chat_model: str | None = Field(None, description="model name of the OpenAI-compatible /v1/chat/completions "
                                   "route (None when the model has no chat template)")


class ErrorOut(BaseModel):
    error: dict = Field(description="status, title and message")


# ---------------------------------------------------------------- interventions
class EditIn(BaseModel):
    feature: int = Field(ge=0, description="feature index")
    mode: Literal["ablate", "clamp", "add", "orthogonal", "cap"] = Field(
        "add", description="ablate: set to 0; clamp: set to value; the steering methods of Neuronpedia's inference "
        "server, with v the decoder direction: add (SIMPLE_ADDITIVE) h += value v; orthogonal (ORTHOGONAL_DECOMP) "
        "h := (I - P) h + value P h, P = v v^T / |v|^2; cap (PROJECTION_CAP) the projection of h on v / |v| capped "
        "at value")
    value: float = Field(0.0, ge=-WORKER.max_abs_value, le=WORKER.max_abs_value, allow_inf_nan=False,
                         description="clamp value or steering strength (add: in the feature's activation units)")
    positions: list[int] | None = Field(None, max_length=WORKER.max_prompt_tokens,
                                        description="token positions to edit (0 = first token); all when absent")
    normalize: bool = Field(False, description="steer along v / |v| (Neuronpedia's normalize_steering; changes "
                            "only add, since orthogonal and cap use the direction alone)")


class EditsIn(TextIn):
    edits: list[EditIn] = Field(min_length=1, max_length=WORKER.max_edits, description="the interventions")


class SteerIn(EditsIn):
    max_new_tokens: int = Field(WORKER.default_new_tokens, ge=1, le=WORKER.max_new_tokens,
                                description="tokens to generate")
    temperature: float = Field(0.0, ge=0.0, le=WORKER.max_temperature, allow_inf_nan=False, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int = Field(0, ge=0, le=WORKER.max_seed, description="sampling seed (same seed, same tokens)")
    n_logprobs: int = Field(WORKER.default_logprobs, ge=0, le=WORKER.max_logprobs,
                            description="most likely tokens reported with each generated token")
    kl: bool = Field(True, description="report KL(default || steered) of the next-token distribution per step "
                     "(the default model is fed the steered tokens as one more batch row)")


class TopLogprobOut(BaseModel):
    token: str = Field(description="display string")
    id: int = Field(description="token id")
    logprob: float = Field(description="log-prob (natural log, before temperature)")


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut] = Field(description="that step's most likely tokens, most likely first")


class ContinuationOut(BaseModel):
    ids: list[int] = Field(description="new token ids")
    tokens: list[str] = Field(description="display strings of the new tokens")
    text: str = Field(description="the new tokens decoded together")
    logprobs: list[float] = Field(description="log-prob of each new token where it was chosen")
    feature_acts: list[list[float]] = Field(description="per new token, the activation of each steered feature "
                                            "(read before the edit)")
    token_logprobs: list[TokenLogprobOut] = Field([], description="per new token: {token, logprob, top_logprobs}")


class FeatureScaleOut(BaseModel):
    feature: int = Field(description="feature index")
    decoder_norm: float = Field(description="|W_dec[f]|")
    projection: float = Field(description="median over the prompt of h . W_dec[f] / |W_dec[f]| at the hook")


class ScaleOut(BaseModel):
    resid_norm: float = Field(description="median |h| at the hook over the prompt (the first position left out)")
    features: list[FeatureScaleOut] = Field(description="per steered feature, what the suggested strengths use")


class SteerOut(BaseModel):
    prompt_tokens: list[str] = Field(description="display strings of the prompt's tokens")
    watch: list[int] = Field(description="the steered features, in the order of feature_acts columns")
    default: ContinuationOut = Field(description="the model's own continuation")
    steered: ContinuationOut = Field(description="the continuation with the edits applied")
    stopped: Literal["length", "eos", "time"] = Field(description="why generation stopped")
    seconds: float = Field(description="time spent generating")
    kl: list[float] | None = Field(None, description="per steered token: KL(default || steered) of the next-token "
                                   "distribution given the steered prefix, nats")
    scale: ScaleOut | None = Field(None, description="residual norm and projections the suggested strengths use")


class ChatTurnIn(BaseModel):
    role: Literal["system", "user", "assistant"] = Field(description="who wrote the message")
    content: str = Field(max_length=WORKER.max_message_chars, description="the message")


class ChatSteerIn(BaseModel):
    sae_id: str = Field(description="which SAE to steer with")
    messages: list[ChatTurnIn] = Field(min_length=1, max_length=WORKER.max_chat_turns,
                                       description="the conversation, oldest first, ending with a user message")
    edits: list[EditIn] = Field(min_length=1, max_length=WORKER.max_edits, description="the interventions")
    max_new_tokens: int = Field(WORKER.default_new_tokens, ge=1, le=WORKER.max_new_tokens,
                                description="tokens of each reply")
    temperature: float = Field(0.0, ge=0.0, le=WORKER.max_temperature, allow_inf_nan=False, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int = Field(0, ge=0, le=WORKER.max_seed, description="sampling seed of both replies")
    n_logprobs: int = Field(WORKER.default_logprobs, ge=0, le=WORKER.max_logprobs,
                            description="most likely tokens reported with each generated token")
    kl: bool = Field(True, description="report KL(default || steered) per step")


class ChatSteerOut(SteerOut):
    template: str = Field(description="the conversation rendered by the model's chat template (generation prompt "
                          "included); prompt_tokens are its tokens")
    default_reply: str = Field(description="the default assistant reply as a message (special tokens dropped)")
    steered_reply: str = Field(description="the steered assistant reply as a message")


class AblateOut(BaseModel):
    tokens: list[str] = Field(description="display strings of the text's tokens")
    delta_logprob: list[float | None] = Field(description="per token t: change of log p(token t+1) when edited "
                                              "(None at the last token)")
    kl: list[float] = Field(description="per token: KL(clean || edited) of the next-token distribution, nats")
    clean_logprob: list[float | None] = Field(description="per token t: clean log p(token t+1)")
    feature_acts: dict[str, list[float]] = Field(description="clean activation of each edited feature per token")


class AttributeIn(TextIn):
    position: int | None = Field(None, ge=0, description="the token whose next-token prediction is explained "
                                 "(default: the last)")
    target: int | None = Field(None, ge=0, description="target token id (default: the model's top prediction)")
    n_top: int = Field(WORKER.attribution_top, ge=1, le=WORKER.max_n_top, description="features listed")
    n_verify: int = Field(WORKER.attribution_verify, ge=0, le=WORKER.max_verify, description="of these, how many are truly ablated")


class AttributionOut(BaseModel):
    feature: int = Field(description="feature index")
    attribution: float = Field(description="sum over positions <= p of activation x d log p(target) / d activation")
    best_position: int = Field(description="position with the largest single-position attribution")
    activation_at_best_position: float = Field(description="the feature's activation at best_position")
    activation_at_position: float = Field(description="the feature's activation at the explained position")
    ablation_estimate: float = Field(description="linear estimate of the change of log p(target) when the feature "
                                     "is ablated everywhere (= -attribution)")
    ablation_true: float | None = Field(None, description="the measured change when it is ablated (top features)")


class AttributeOut(BaseModel):
    tokens: list[str] = Field(description="display strings of the prompt's tokens")
    position: int = Field(description="the explained position")
    target: int = Field(description="target token id")
    target_token: str = Field(description="its display string")
    target_logprob: float = Field(description="clean log p(target) at the position")
    top_predictions: list[tuple[str, int, float]] = Field(description="the model's top next tokens there: "
                                                          "(string, id, log-prob)")
    features: list[AttributionOut] = Field(description="features by |attribution|")
    error_attribution: float = Field(description="attribution of the SAE's error term (what the SAE misses)")
    n_active: int = Field(description="active (position, feature) pairs")


# ---------------------------------------------------------------- activation patching
class PatchIn(BaseModel):
    sae_id: str = Field(description="the SAE whose latents are patched")
    clean: str = Field("", max_length=MAX_TEXT_CHARS, description="the clean prompt")
    corrupted: str = Field("", max_length=MAX_TEXT_CHARS, description="the corrupted (counterfactual) prompt")
    clean_ids: list[int] | None = Field(None, description="token ids to use verbatim instead of clean")
    corrupted_ids: list[int] | None = Field(None, description="token ids to use verbatim instead of corrupted")
    metric: Literal["logprob", "logit_diff"] = Field("logprob", description="log p(target), or logit(target) - "
                                                     "logit(other), at the base prompt's last token")
    target: int | None = Field(None, ge=0, description="target token id (default: the clean run's top prediction)")
    other: int | None = Field(None, ge=0, description="logit_diff's second token id (default: the corrupted run's "
                              "top prediction)")
    target_text: str | None = Field(None, max_length=WORKER.max_token_text_chars, description="the target as text (one token, e.g. ' Paris')"
                                    " instead of its id")
    other_text: str | None = Field(None, max_length=WORKER.max_token_text_chars, description="the other token as text instead of its id")
    direction: Literal["corrupted_into_clean", "clean_into_corrupted"] = Field(
        "corrupted_into_clean", description="which run is patched with the other's latents")
    align: list[tuple[int, int]] | None = Field(None, max_length=WORKER.max_prompt_tokens,
                                                description="(clean position, corrupted position) pairs; "
                                                "needed when the token lengths differ")
    features: list[int] | None = Field(None, min_length=1, max_length=WORKER.max_patch_features,
                                       description="latents to patch per position and the heatmap's columns "
                                       "(default: all latents; columns the largest estimates)")
    positions: list[int] | None = Field(None, min_length=1, max_length=WORKER.max_prompt_tokens,
                                        description="base positions to patch (default: every aligned one)")
    n_features: int = Field(WORKER.patch_features, ge=1, le=WORKER.max_patch_features,
                            description="heatmap columns when no features are given")
    patch_error: bool = Field(False, description="per-position rows patch the SAE's error term too")


class PatchEntryOut(BaseModel):
    key: int = Field(description="the position or the feature")
    metric: float = Field(description="the metric after the real patch")
    change: float = Field(description="metric - base metric")
    fraction: float | None = Field(description="change / (source metric - base metric): the share of the "
                                   "difference the patch moves (None when the two prompts agree)")
    estimate: float = Field(description="attribution-patching estimate of change: (z_src - z_base) . d metric / dz")
    estimate_fraction: float | None = Field(description="estimate / (source metric - base metric)")


class PatchOut(BaseModel):
    clean_tokens: list[str] = Field(description="display strings of the clean prompt's tokens")
    corrupted_tokens: list[str] = Field(description="display strings of the corrupted prompt's tokens")
    direction: str = Field(description="corrupted_into_clean or clean_into_corrupted")
    metric: str = Field(description="logprob or logit_diff")
    target: int = Field(description="target token id")
    target_token: str = Field(description="its display string")
    other: int | None = Field(description="logit_diff's second token id")
    other_token: str | None = Field(description="its display string")
    clean_metric: float = Field(description="the metric on the clean prompt")
    corrupted_metric: float = Field(description="the metric on the corrupted prompt")
    base_metric: float = Field(description="the metric of the patched (base) run before patching")
    source_metric: float = Field(description="the metric of the run the latents come from")
    positions: list[int] = Field(description="patched base positions")
    source_positions: list[int] = Field(description="the source position aligned with each")
    features: list[int] = Field(description="the heatmap's features")
    per_position: list[PatchEntryOut] = Field(description="per position: the chosen latents (or all) patched there")
    per_feature: list[PatchEntryOut] = Field(description="per feature: patched at every position")
    cells: list[list[float]] = Field(description="(position, feature): real change of the metric")
    cell_estimates: list[list[float]] = Field(description="(position, feature): the estimate of that change")
    all_latents: float = Field(description="metric with every latent at every position patched")
    all_with_error: float = Field(description="... and the error term too (the source metric up to rounding)")
    error_estimate: list[float] = Field(description="per position: the error term's estimate")
    seconds: dict[str, float] = Field(description="time spent")


# ---------------------------------------------------------------- explanations
class ExampleIn(BaseModel):
    tokens: list[str] = Field(min_length=1, max_length=WORKER.max_prompt_tokens, description="token strings of a context")
    acts: list[float] = Field(max_length=WORKER.max_prompt_tokens, description="the feature's activation on each token")


class ExplainIn(BaseModel):
    """A feature's stored material; the worker explains it with its own model (precompute.explain)."""

    top: list[ExampleIn] = Field(min_length=1, max_length=WORKER.max_explain_examples,
                                 description="top-activating examples, strongest first")
    quantiles: list[list[ExampleIn]] = Field([], max_length=WORKER.max_explain_examples,
                                             description="quantile samples, one list per group")
    non_activating: list[list[str]] = Field([], max_length=WORKER.max_explain_examples,
                                            description="token strings of contexts where the feature is 0 everywhere "
                                            "(needed only to score)")
    score: bool = Field(False, description="also score the explanation by detection and fuzzing (slow)")
    max_tokens: int = Field(WORKER.explain_max_tokens, ge=1, le=WORKER.chat_max_tokens,
                            description="answer budget of the explainer")
    seed: int = Field(0, ge=0, le=WORKER.max_seed, description="seed of the example split")


class ScoreOut(BaseModel):
    method: str = Field(description="detection or fuzzing")
    balanced_accuracy: float | None = Field(description="(TPR + TNR) / 2 over parsed answers; 0.5 is chance; "
                                            "None unless both classes got a parsed answer")
    n_examples: int = Field(description="snippets shown to the judge")
    n_judged: int = Field(description="snippets with a parsed answer")


class ExplainOut(BaseModel):
    explanation: str = Field(description="the explanation (empty when the model gave none)")
    parsed: bool = Field(description="whether the answer carried the [EXPLANATION]: marker")
    llm: str = Field(description="the model that explained")
    prompt_version: str = Field(description="version of the prompts")
    n_examples: int = Field(description="examples shown to the explainer")
    scores: list[ScoreOut] = Field([], description="detection and fuzzing results when asked to score")
    score_error: str | None = Field(None, description="why scoring could not run, when asked")
    seconds: float = Field(description="time spent")


# ---------------------------------------------------------------- attribution graphs (routes/graph.py)
from saescope.precompute.config import CIRCUIT  # noqa: E402  (graph bounds are offline-side defaults)

from ..settings import GRAPH  # noqa: E402


class GraphIn(BaseModel):
    """An attribution graph for one prompt over the worker's transcoders (circuit-tracer's definitions), or, when it
    has none, over its residual-stream SAEs (MLPs linearised at the prompt; the graph's metadata says which)."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="the prompt (BOS is added)")
    target: str | None = Field(None, max_length=GRAPH.max_target_chars, description="one-token logit target; default: the top tokens "
                               f"until cumulative probability {CIRCUIT.logit_prob}, at most {CIRCUIT.max_logits}")
    sae_ids: list[str] | None = Field(None, max_length=GRAPH.max_ids, description="the transcoders, or the residual-stream "
                                      "SAEs, to use (default: every transcoder of the worker, one per layer; without "
                                      "transcoders every residual-stream SAE, one per point of the stream)")
    node_threshold: float = Field(CIRCUIT.node_threshold, ge=0.0, le=1.0, description="cumulative influence kept (nodes)")
    edge_threshold: float = Field(CIRCUIT.edge_threshold, ge=0.0, le=1.0, description="cumulative edge score kept")
    max_feature_nodes: int = Field(CIRCUIT.max_feature_nodes, ge=1, le=CIRCUIT.max_feature_nodes,
                                   description="feature nodes whose incoming edges are computed")
    verify: bool = Field(True, description="check the top nodes and edges by real ablations")


class NodeCheckOut(BaseModel):
    node_id: str = Field(description="the node (its id in `graph`)")
    estimate: float = Field(description="graph's predicted change of the target logit (demeaned) if ablated")
    true: float = Field(description="measured change in the real model (nothing frozen)")
    agree: bool


class EdgeCheckOut(BaseModel):
    source: str
    target: str
    weight: float = Field(description="the edge weight")
    estimate: float = Field(description="graph's predicted change of the target's activation if the source is ablated")
    true: float = Field(description="measured change of the target's activation in the real model")
    agree: bool


class GraphOut(BaseModel):
    graph: dict = Field(description="the pruned graph in circuit-tracer's / Neuronpedia's JSON format")
    replacement_score: float
    completeness_score: float
    node_checks: list[NodeCheckOut]
    edge_checks: list[EdgeCheckOut]
    sae_ids: dict[int, str] = Field(description="graph layer -> the transcoder or residual-stream "
                                   "SAE (sae_id) used there (residual graphs: graph layer k is the k-th SAE along the stream)")
    seconds: float = Field(description="wall time of this request")
    cached: bool = Field(False, description="the unpruned graph came from the worker's graph cache (same prompt, "
                         "target, max_feature_nodes and transcoders): only pruning and the checks ran")
    graph_seconds: float = Field(0.0, description="wall time of building the unpruned graph (when it was built)")


class GraphEditIn(BaseModel):
    """One node intervention: a transcoder feature at a (layer, position) set to a multiple of its activation or a value."""

    layer: int = Field(ge=0, description="the feature's layer (its node id is LAYER_FEATURE_POS)")
    pos: int = Field(ge=0, lt=CIRCUIT.max_tokens, description="prompt position (0 = BOS)")
    feature: int = Field(ge=0, description="feature index in the layer's transcoder")
    mode: Literal["scale", "set"] = Field("scale", description="scale: activation x value; set: activation := value")
    value: float = Field(ge=-WORKER.max_abs_value, le=WORKER.max_abs_value, allow_inf_nan=False,
                         description="the multiple (scale) or the new activation (set)")


class GraphInterveneIn(BaseModel):
    """Node interventions from a graph: the new top next tokens with attention frozen and in the real model."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="the graph's prompt (BOS is added)")
    sae_ids: list[str] | None = Field(None, max_length=GRAPH.max_ids, description="the transcoders (default: every "
                                      "transcoder of the worker, one per layer), as for POST /graph")
    edits: list[GraphEditIn] = Field(min_length=1, max_length=WORKER.max_edits, description="applied together")
    k: int = Field(WORKER.default_top_logits, ge=1, le=WORKER.max_top_logits, description="top next tokens reported")


class LogitOut(BaseModel):
    token_id: int
    token: str = Field(description="display string")
    prob: float = Field(description="next-token probability at the last position")
    logit: float


class GraphEditOut(BaseModel):
    node_id: str = Field(description="the feature's node id, LAYER_FEATURE_POS")
    mode: str
    value: float
    activation: float = Field(description="the feature's activation on the clean prompt")
    new_activation: float = Field(description="what the edit sets it to")


class GraphInterveneOut(BaseModel):
    clean: list[LogitOut] = Field(description="top k of the unedited model")
    frozen: list[LogitOut] = Field(description="top k with the edits, attention patterns frozen at the clean prompt "
                                   "(norms and MLPs recomputed): circuit-tracer's frozen-attention intervention")
    real: list[LogitOut] = Field(description="top k with the edits in the real model (nothing frozen)")
    edits: list[GraphEditOut]
    tokens: list[str] = Field(description="the prompt's tokens (BOS first)")
    sae_ids: dict[int, str] = Field(description="layer -> the transcoder (sae_id) used there")


# ---------------------------------------------------------------- contrast and search across SAEs
ContrastText = Annotated[str, Field(max_length=WORKER.max_contrast_chars)]


class ContrastIn(BaseModel):
    """Two small sets of texts; the features of one SAE that separate them (precompute.contrast.compute)."""

    sae_id: str = Field(description="the SAE whose features are ranked")
    a: list[ContrastText] = Field(max_length=WORKER.max_contrast_texts, description=f"texts A: 1 to "
                                  f"{WORKER.max_contrast_texts}, each at most {WORKER.max_contrast_chars} characters "
                                  f"and {WORKER.max_contrast_tokens} tokens (BOS included)")
    b: list[ContrastText] = Field(max_length=WORKER.max_contrast_texts, description="texts B, likewise")
    reduce: Literal["max", "mean"] = Field("max", description="per-text reduction of a feature's activations for "
                                           "the ranking")
    top: int = Field(WORKER.contrast_top, ge=1, le=WORKER.max_contrast_top, description="features listed per side")


class ContrastFeatureOut(BaseModel):
    side: Literal["a", "b"] = Field(description="a: higher on A, b: higher on B")
    rank: int = Field(description="0 = best on its side")
    feature: int = Field(description="feature index")
    auroc: float = Field(description="P(an A text scores higher than a B text) + P(tie) / 2")
    mean_a: float = Field(description="mean per-text score over A")
    mean_b: float = Field(description="mean per-text score over B")
    diff: float = Field(description="mean_a - mean_b")
    top_texts: list[int] = Field(description="indices of the side's texts where the feature scores highest, best first")
    top_values: list[float] = Field(description="their scores")
    top_acts: list[list[float]] = Field(description="per listed text, the feature's activation on each of its tokens")


class ContrastOut(BaseModel):
    n_a: int = Field(description="texts in A")
    n_b: int = Field(description="texts in B")
    reduce: str = Field(description="max or mean")
    probe: dict | None = Field(description="sparse probing (k features by mean difference, logistic regression, "
                               "held-out accuracy) and the dense ceiling; None when a side has fewer than 2 texts")
    features: list[ContrastFeatureOut] = Field(description="the ranked features, side a then side b")
    token_ids: dict[str, list[list[int]]] = Field(description="side -> each text's token ids as encoded")
    tokens: dict[str, list[list[str]]] = Field(description="side -> each text's token display strings")
    seconds: float = Field(description="time spent")


class SearchAllIn(BaseModel):
    """A prompt's top features across every SAE of the worker at chosen positions (precompute.search_all)."""

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="the prompt (tokenized with the first "
                      "SAE's BOS convention)")
    positions: list[int] = Field(min_length=1, max_length=WORKER.max_search_positions,
                                 description="token positions to rank by (0 = first token; special tokens never count)")
    top: int = Field(WORKER.search_top, ge=1, le=WORKER.max_search_top, description="features listed over all SAEs")
    sae_ids: list[str] | None = Field(None, max_length=WORKER.max_search_saes, description="the SAEs to search "
                                      "(default: every one)")


class SearchHitOut(BaseModel):
    sae_id: str = Field(description="the SAE")
    feature: int = Field(description="feature index")
    value: float = Field(description="its largest activation over the chosen positions")
    pos: int = Field(description="where that largest activation is")


class SearchAllOut(BaseModel):
    tokens: list[str] = Field(description="display strings of the prompt's tokens")
    positions: list[int] = Field(description="the chosen positions that count (special tokens dropped)")
    hits: list[SearchHitOut] = Field(description="features of every SAE by their activation there, highest first; "
                                     "features whose largest activation on the whole prompt is on BOS left out")
