"""The store's tables as one column spec: CREATE statements, INSERT column lists, the reader's row dataclasses
and the JSON API's SAE model are all derived from it. Bump SCHEMA_VERSION on any change; readers refuse
versions they do not know."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 4  # 2: saes.verify, features.cooc_*/map_*, explanations provenance and scores; 3: quality, contrasts;
#                    4: graphs


@dataclass(frozen=True)
class Col:
    name: str
    sql: str  # DuckDB type
    py: Any  # Python type of the value the reader returns
    doc: str = ""  # what the column holds (becomes the API's field description)
    json: bool = False  # stored as JSON text, read back as a dict


@dataclass(frozen=True)
class Table:
    name: str
    cols: tuple[Col, ...]
    key: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.cols]

    def create_sql(self) -> str:
        cols = [f"{c.name} {c.sql}" for c in self.cols]
        if self.key:
            cols.append(f"PRIMARY KEY ({', '.join(self.key)})")
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({', '.join(cols)})"

    def insert_sql(self, source: str, prefix: str = "") -> str:
        """INSERT INTO table (cols) SELECT cols FROM source: explicit names, never column order."""
        names = ", ".join(self.names)
        return f"INSERT INTO {prefix}{self.name} ({names}) SELECT {names} FROM {source}"

    def select_list(self, alias: str = "") -> str:
        return ", ".join(f"{alias}{n}" for n in self.names)

    def row_type(self, type_name: str) -> type:
        """A dataclass with one field per column, in column order."""
        return dataclasses.make_dataclass(type_name, [(c.name, c.py) for c in self.cols])


C = Col
META = Table("meta", (C("key", "VARCHAR", str), C("value", "VARCHAR", str)), key=("key",))
SAES = Table("saes", (
    C("sae_id", "VARCHAR", str, "name of the SAE inside the store"),
    C("model_id", "VARCHAR", str, "model the activations came from"),
    C("model_path", "VARCHAR", str, "where the model was loaded from (absolute path or hub id)"),
    C("model_key", "VARCHAR", str, "key of the model's vocabulary in the vocab table"),
    C("sae_path", "VARCHAR", str, "where the SAE was loaded from (absolute path or hub reference)"),
    C("hook", "VARCHAR", str, "TransformerLens-style hook name"),
    C("architecture", "VARCHAR", str, "standard, jumprelu, topk or gated"),
    C("d_in", "INTEGER", int, "width of the hooked activation"),
    C("d_sae", "INTEGER", int, "number of features"),
    C("dataset", "VARCHAR", str, "text the statistics were computed on"),
    C("n_tokens", "BIGINT", int, "tokens streamed"),
    C("n_contexts", "BIGINT", int, "contexts streamed"),
    C("n_counted", "BIGINT", int, "tokens that count (special tokens excluded)"),
    C("context_len", "INTEGER", int, "tokens per context"),
    C("prepend_bos", "BOOLEAN", bool, "whether every context starts with BOS"),
    C("config", "VARCHAR", dict, "the SAE's configuration as loaded", json=True),
    C("created", "VARCHAR", str, "when the SAE's tables were built (UTC)"),
    C("saescope_version", "VARCHAR", str, "saescope version that built them"),
    C("logit_method", "VARCHAR", str, "how logit effects were computed"),
    C("dead_share", "DOUBLE", float, "share of features never active on these tokens"),
    C("density_hist", "INTEGER[]", list, "histogram of log10 feature density (live features)"),
    C("density_hist_lo", "DOUBLE", float, "log10 density at the histogram's left edge"),
    C("density_hist_hi", "DOUBLE", float, "log10 density at the histogram's right edge"),
    C("params", "VARCHAR", dict, "precompute parameters (top_k, intervals, device, dtype, ...)", json=True),
    C("verify", "VARCHAR", dict, "fp32 recomputation of a sample of stored examples: contexts, max_rel_diff, "
      "zero/nonzero mismatches, date (that of `created` when precompute ran it) and the command that reproduces it "
      "(empty if never verified)", json=True),
), key=("sae_id",))
VOCAB = Table("vocab", (C("model_key", "VARCHAR", str), C("token_id", "INTEGER", int), C("token", "VARCHAR", str)))
CONTEXTS = Table("contexts", (C("sae_id", "VARCHAR", str), C("ctx_id", "INTEGER", int), C("tokens", "INTEGER[]", list)))
FEATURES = Table("features", (
    C("sae_id", "VARCHAR", str), C("feature", "INTEGER", int), C("n_active", "BIGINT", int),
    C("density", "DOUBLE", float), C("max_act", "REAL", float), C("mean_act", "REAL", float),
    C("hist_lo", "REAL", float), C("hist_hi", "REAL", float), C("hist", "INTEGER[]", list),
    C("top_token_ids", "INTEGER[]", list),
    C("logit_pos_ids", "INTEGER[]", list), C("logit_pos_vals", "REAL[]", list),
    C("logit_neg_ids", "INTEGER[]", list), C("logit_neg_vals", "REAL[]", list),
    C("logit_hist_lo", "REAL", float), C("logit_hist_hi", "REAL", float), C("logit_hist", "INTEGER[]", list),
    C("neighbours", "INTEGER[]", list), C("neighbour_sims", "REAL[]", list),
    C("logit_mean", "REAL", float),  # mean logit effect over the vocabulary (softmax ignores it: centred = raw - mean)
    C("cooc_ids", "INTEGER[]", list), C("cooc_jaccard", "REAL[]", list),  # co-occurring features (NULL until filled)
    C("map_x", "REAL", float), C("map_y", "REAL", float),  # 2-D feature map coordinates (NULL until filled)
))
EXAMPLES = Table("examples", (
    C("sae_id", "VARCHAR", str), C("feature", "INTEGER", int), C("kind", "VARCHAR", str), C("grp", "SMALLINT", int),
    C("rank", "SMALLINT", int), C("ctx_id", "INTEGER", int), C("pos", "SMALLINT", int), C("value", "REAL", float),
    C("act_pos", "SMALLINT[]", list), C("act_val", "REAL[]", list),
))
GROUPS = Table("groups", (
    C("sae_id", "VARCHAR", str), C("feature", "INTEGER", int), C("kind", "VARCHAR", str), C("grp", "SMALLINT", int),
    C("lo", "REAL", float), C("hi", "REAL", float), C("n_tokens", "BIGINT", int), C("share", "DOUBLE", float),
))
EXPLANATIONS = Table("explanations", (
    C("sae_id", "VARCHAR", str), C("feature", "INTEGER", int), C("text", "VARCHAR", str), C("source", "VARCHAR", str),
    C("llm", "VARCHAR", str), C("prompt_version", "VARCHAR", str), C("created", "VARCHAR", str),
    C("score_detection", "DOUBLE", float), C("score_fuzzing", "DOUBLE", float), C("n_scored", "INTEGER", int),
))
CROSS = Table("cross_matches", (  # nearest decoder directions in another SAE of the same width (same run)
    C("sae_id", "VARCHAR", str), C("feature", "INTEGER", int), C("other", "VARCHAR", str),
    C("ids", "INTEGER[]", list), C("cos", "REAL[]", list),
))
_Q = "SAELens evals / SAEBench core (precompute/quality.py): "
QUALITY = Table("quality", (  # one row per SAE: quality metrics on a held-out slice of the token stream
    C("sae_id", "VARCHAR", str, "name of the SAE inside the store"),
    C("formula_version", "VARCHAR", str, "which definitions the numbers follow (precompute/quality.py)"),
    C("dataset", "VARCHAR", str, "text the eval tokens came from"),
    C("first_ctx", "BIGINT", int, "index of the first eval context in the dataset's context stream"),
    C("n_contexts", "BIGINT", int, "eval contexts"),
    C("context_len", "INTEGER", int, "tokens per eval context"),
    C("n_tokens", "BIGINT", int, "eval tokens that count (structural special tokens excluded)"),
    C("held_out", "BOOLEAN", bool, "whether the eval contexts follow the streamed ones (else: the last streamed)"),
    C("dtype", "VARCHAR", str, "model dtype of the eval passes"),
    C("seconds", "DOUBLE", float, "wall time of the eval passes (all SAEs of the run together)"),
    C("created", "VARCHAR", str, "when the metrics were computed (UTC)"),
    C("ce_loss_score", "DOUBLE", float, _Q + "(CE_ablated - CE_sae) / (CE_ablated - CE_orig)"),
    C("ce_loss_without_sae", "DOUBLE", float, _Q + "CE_orig: mean next-token cross-entropy of the model"),
    C("ce_loss_with_sae", "DOUBLE", float, _Q + "CE_sae: with the SAE reconstruction spliced in (no error term)"),
    C("ce_loss_with_ablation", "DOUBLE", float, _Q + "CE_ablated: with the hook output zero-ablated"),
    C("kl_div_score", "DOUBLE", float, _Q + "(KL_ablated - KL_sae) / KL_ablated"),
    C("kl_div_with_sae", "DOUBLE", float, _Q + "mean KL(original || spliced) per token"),
    C("kl_div_with_ablation", "DOUBLE", float, _Q + "mean KL(original || zero-ablated) per token"),
    C("explained_variance", "DOUBLE", float, _Q + "1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)"),
    C("mse", "DOUBLE", float, _Q + "mean over tokens of ||x - x_hat||^2"),
    C("cossim", "DOUBLE", float, _Q + "mean cosine of x and x_hat"),
    C("l2_norm_in", "DOUBLE", float, _Q + "mean ||x||"),
    C("l2_norm_out", "DOUBLE", float, _Q + "mean ||x_hat||"),
    C("l2_ratio", "DOUBLE", float, _Q + "mean ||x_hat|| / ||x||"),
    C("relative_reconstruction_bias", "DOUBLE", float, _Q + "E||x_hat||^2 / E<x, x_hat>"),
    C("l0", "DOUBLE", float, _Q + "mean active features per token"),
    C("l1", "DOUBLE", float, _Q + "mean sum of |feature activations| per token"),
    C("frac_alive", "DOUBLE", float, _Q + "share of features active on some eval token"),
    C("freq_over_1_percent", "DOUBLE", float, _Q + "share of features with density > 1%"),
    C("freq_over_10_percent", "DOUBLE", float, _Q + "share of features with density > 10%"),
    C("normalized_freq_over_1_percent", "DOUBLE", float, _Q + "share of all activations from features > 1%"),
    C("normalized_freq_over_10_percent", "DOUBLE", float, _Q + "share of all activations from features > 10%"),
    C("average_max_encoder_cosine_sim", "DOUBLE", float, _Q + "mean over features of the largest encoder cosine"),
    C("average_max_decoder_cosine_sim", "DOUBLE", float, _Q + "mean over features of the largest decoder cosine"),
), key=("sae_id",))
CONTRASTS = Table("contrasts", (  # one row per stored contrast (`saescope contrast`, precompute/contrast.py)
    C("sae_id", "VARCHAR", str, "the SAE"), C("name", "VARCHAR", str, "the contrast's name (its page: /sae/ID/contrast/NAME)"),
    C("a_source", "VARCHAR", str, "where the A texts came from"), C("b_source", "VARCHAR", str, "where the B texts came from"),
    C("n_a", "INTEGER", int, "texts in A"), C("n_b", "INTEGER", int, "texts in B"),
    C("reduce", "VARCHAR", str, "per-text reduction of a feature's activations for the ranking: max or mean"),
    C("probe", "VARCHAR", dict, "sparse probing: ks, features per k, test accuracies, dense accuracy, split", json=True),
    C("created", "VARCHAR", str, "when it was computed (UTC)"),
), key=("sae_id", "name"))
CONTRAST_FEATURES = Table("contrast_features", (  # the ranked features of each contrast, both sides
    C("sae_id", "VARCHAR", str), C("name", "VARCHAR", str), C("side", "VARCHAR", str), C("rank", "INTEGER", int),
    C("feature", "INTEGER", int), C("auroc", "DOUBLE", float), C("mean_a", "DOUBLE", float),
    C("mean_b", "DOUBLE", float), C("diff", "DOUBLE", float),
    C("top_texts", "INTEGER[]", list),  # indices of the side's texts where the feature is highest, best first
    C("top_values", "REAL[]", list),
    C("top_acts", "REAL[][]", list),  # per listed text, the feature's activation on each of its tokens (highlighting)
))
CONTRAST_TEXTS = Table("contrast_texts", (  # the texts of each contrast, tokenized as they were encoded
    C("sae_id", "VARCHAR", str), C("name", "VARCHAR", str), C("side", "VARCHAR", str), C("idx", "INTEGER", int),
    C("token_ids", "INTEGER[]", list),
))
GRAPHS = Table("graphs", (  # stored attribution graphs (`saescope graph STORE`), pages /graph/SLUG without the worker
    C("slug", "VARCHAR", str, "the graph's name (its page: /graph/SLUG, its file: /graph/SLUG.json)"),
    C("prompt", "VARCHAR", str, "the prompt the graph explains"),
    C("target", "VARCHAR", str, "the logit target named when it was computed ('' = the top tokens)"),
    C("source", "VARCHAR", str, "computed (with the model, transcoders and settings) or imported (from which file)"),
    C("created", "VARCHAR", str, "when it was stored (UTC)"),
    C("n_nodes", "INTEGER", int, "nodes of the stored (pruned) graph"),
    C("n_links", "INTEGER", int, "links of the stored graph"),
    C("replacement_score", "DOUBLE", float, "the graph's replacement score (NULL when the file has none)"),
    C("completeness_score", "DOUBLE", float, "the graph's completeness score (NULL when the file has none)"),
    C("sae_ids", "VARCHAR", dict, "layer -> the store's transcoder (sae_id) its feature nodes belong to", json=True),
    C("graph", "VARCHAR", str, "the graph as circuit-tracer's JSON text, exactly as checked and stored"),
), key=("slug",))
STORE_TABLES = (META, SAES, VOCAB, CONTEXTS, FEATURES, EXAMPLES, GROUPS, EXPLANATIONS, CROSS, QUALITY, CONTRASTS,
                CONTRAST_FEATURES, CONTRAST_TEXTS, GRAPHS)
PER_SAE_TABLES = (SAES, CONTEXTS, FEATURES, EXAMPLES, GROUPS, EXPLANATIONS, CROSS, QUALITY, CONTRASTS,
                  CONTRAST_FEATURES, CONTRAST_TEXTS)  # rows keyed by sae_id

def create_all(tables: tuple[Table, ...]) -> str:
    return ";\n".join(t.create_sql() for t in tables) + ";"


# A deterministic pseudo-random priority per (token, feature): samples are the lowest priorities in their
# group, so an independent computation can reproduce exactly which tokens were drawn.
PRIORITY_SQL = "(((ctx::BIGINT * {T} + pos) * 2654435761 + feature::BIGINT * 2246822519) % 4294967291)"


def priority(ctx: int, pos: int, feature: int, context_len: int) -> int:
    return ((ctx * context_len + pos) * 2654435761 + feature * 2246822519) % 4294967291
