"""The store's tables. Bump SCHEMA_VERSION on any change; readers refuse versions they do not know."""

SCHEMA_VERSION = 1

TABLES = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS saes (
    sae_id VARCHAR PRIMARY KEY, model_id VARCHAR, model_path VARCHAR, model_key VARCHAR, sae_path VARCHAR,
    hook VARCHAR, architecture VARCHAR, d_in INTEGER, d_sae INTEGER, dataset VARCHAR, n_tokens BIGINT,
    n_contexts BIGINT, n_counted BIGINT, context_len INTEGER, prepend_bos BOOLEAN, config VARCHAR,
    created VARCHAR, saescope_version VARCHAR, logit_method VARCHAR, dead_share DOUBLE,
    density_hist INTEGER[], density_hist_lo DOUBLE, density_hist_hi DOUBLE, params VARCHAR);
CREATE TABLE IF NOT EXISTS vocab (model_key VARCHAR, token_id INTEGER, token VARCHAR);
CREATE TABLE IF NOT EXISTS contexts (sae_id VARCHAR, ctx_id INTEGER, tokens INTEGER[]);
CREATE TABLE IF NOT EXISTS features (
    sae_id VARCHAR, feature INTEGER, n_active BIGINT, density DOUBLE, max_act REAL, mean_act REAL,
    hist_lo REAL, hist_hi REAL, hist INTEGER[], top_token_ids INTEGER[],
    logit_pos_ids INTEGER[], logit_pos_vals REAL[], logit_neg_ids INTEGER[], logit_neg_vals REAL[],
    logit_hist_lo REAL, logit_hist_hi REAL, logit_hist INTEGER[], neighbours INTEGER[], neighbour_sims REAL[]);
CREATE TABLE IF NOT EXISTS examples (
    sae_id VARCHAR, feature INTEGER, kind VARCHAR, grp SMALLINT, rank SMALLINT, ctx_id INTEGER,
    pos SMALLINT, value REAL, act_pos SMALLINT[], act_val REAL[]);
CREATE TABLE IF NOT EXISTS groups (
    sae_id VARCHAR, feature INTEGER, kind VARCHAR, grp SMALLINT, lo REAL, hi REAL, n_tokens BIGINT, share DOUBLE);
CREATE TABLE IF NOT EXISTS explanations (sae_id VARCHAR, feature INTEGER, text VARCHAR, source VARCHAR);
"""

CACHE_TABLES = """
CREATE TABLE IF NOT EXISTS run (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS acts (ctx INTEGER, pos SMALLINT, feature INTEGER, value REAL);
CREATE TABLE IF NOT EXISTS ctx_tokens (ctx INTEGER, tokens INTEGER[], n_counted INTEGER);
"""

# A deterministic pseudo-random priority per (token, feature): samples are the lowest priorities in their
# group, so an independent computation can reproduce exactly which tokens were drawn.
PRIORITY_SQL = "(((ctx::BIGINT * {T} + pos) * 2654435761 + feature::BIGINT * 2246822519) % 4294967291)"


def priority(ctx: int, pos: int, feature: int, context_len: int) -> int:
    return ((ctx * context_len + pos) * 2654435761 + feature * 2246822519) % 4294967291
