-- vlmindex catalog schema. Table and column names are an interface users write SQL against:
-- add columns freely, never rename. Bump SCHEMA_VERSION in vlmindex/catalog/workspace.py and add a
-- migration there when an existing workspace needs changing. Every table is described in
-- docs/tables.md; metric definitions are in docs/metrics.md.
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);

CREATE TABLE IF NOT EXISTS datasets (
    name VARCHAR PRIMARY KEY,
    format VARCHAR NOT NULL,
    source VARCHAR,
    options JSON,
    n_images BIGINT,
    n_skipped BIGINT,
    ingested_at TIMESTAMP
);

CREATE TABLE IF NOT EXISTS images (
    image_id BIGINT PRIMARY KEY,     -- FAISS id; stable hash of (dataset, relative path)
    dataset VARCHAR NOT NULL,
    path VARCHAR NOT NULL,           -- the file every later stage reads (absolute)
    source_path VARCHAR,             -- original file when converted at ingest (MedMNIST, DICOM)
    label VARCHAR,
    split VARCHAR,
    group_id VARCHAR,                -- patient or lesion; the image itself when unknown
    modality VARCHAR,
    width INTEGER,
    height INTEGER,
    sha256 VARCHAR,
    ingested_at TIMESTAMP,
    pixel_sha256 VARCHAR             -- of the decoded RGB pixels and their shape: equal for a re-encoded copy
);

-- Files an ingest could not use, with the reason: a silently dropped image skews a study.
CREATE TABLE IF NOT EXISTS skipped (
    dataset VARCHAR NOT NULL,
    path VARCHAR NOT NULL,
    reason VARCHAR NOT NULL,
    skipped_at TIMESTAMP,
    stage VARCHAR,                   -- ingest, embed
    model VARCHAR,                   -- embed: the model that could not use the image
    condition VARCHAR                -- embed: the condition it was loaded under
);

CREATE TABLE IF NOT EXISTS conditions (
    dataset VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    recipe JSON NOT NULL,
    created_at TIMESTAMP,
    PRIMARY KEY (dataset, name)
);

-- Burned-in text found by OCR (vlmindex detect-text), one row per image and condition, so real
-- datasets can be sliced by detected text. has_text is NULL and error says why when an image
-- could not be read: a silently dropped image skews a study.
CREATE TABLE IF NOT EXISTS text_detections (
    dataset VARCHAR NOT NULL,
    condition VARCHAR NOT NULL,       -- 'clean' or an overlay condition's name
    image_id BIGINT NOT NULL,
    has_text BOOLEAN,
    text VARCHAR,                     -- recognised strings in reading order, joined by ' '
    area_fraction DOUBLE,             -- union of text boxes / image area, in [0, 1]
    n_boxes INTEGER,
    score DOUBLE,                     -- lowest recognition confidence among kept boxes
    boxes JSON,                       -- [[x0,y0,x1,y1,x2,y2,x3,y3], ...] in image pixels
    engine VARCHAR,                   -- OCR package, version and settings
    error VARCHAR,
    detected_at TIMESTAMP,
    pixels VARCHAR,                   -- image_pixels.pixels of what was read: a change redoes the row
    PRIMARY KEY (dataset, condition, image_id)
);

-- One row per embedding run that embedded anything (a resumed or sharded run adds a row).
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    model VARCHAR NOT NULL,
    dataset VARCHAR NOT NULL,
    condition VARCHAR NOT NULL,
    split VARCHAR,
    shard VARCHAR,
    n BIGINT,                 -- images embedded by this run
    total BIGINT,             -- images of the selection embedded after it
    dim INTEGER,
    dtype VARCHAR,
    seconds DOUBLE,
    images_per_s DOUBLE,
    device VARCHAR,
    batch_size INTEGER,
    num_workers INTEGER,
    preprocessing JSON,
    versions JSON,
    weights_sha256 VARCHAR,
    started_at TIMESTAMP,
    finished_at TIMESTAMP,
    recorded_from VARCHAR,    -- embed, import, or parts (rebuilt from the parts' own provenance)
    family VARCHAR            -- medical, general, llm-enhanced, baseline (registry, or --family); NULL: not said
);

-- One row per query image and analysis (vlmindex analyze). Metric definitions: docs/metrics.md.
CREATE TABLE IF NOT EXISTS query_metrics (
    analysis_id VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    dataset VARCHAR NOT NULL,
    condition VARCHAR NOT NULL,
    image_id BIGINT NOT NULL,
    label VARCHAR,
    modality VARCHAR,
    split VARCHAR,
    k INTEGER,
    exclude_group BOOLEAN,
    n_relevant BIGINT,        -- R: gallery items of the query's class after exclusions
    purity_at_k DOUBLE,
    ap DOUBLE,                -- over the full ranking; NULL when R = 0
    map_at_r DOUBLE,
    r_precision DOUBLE,
    p_at_1 DOUBLE,
    knn_pred VARCHAR,
    knn_correct BOOLEAN
);

-- One row per analysis: headline metrics (micro = mean over queries, macro = mean of class
-- means) and distribution figures, with the provenance of every number.
CREATE TABLE IF NOT EXISTS summaries (
    analysis_id VARCHAR PRIMARY KEY,
    model VARCHAR NOT NULL,
    dataset VARCHAR NOT NULL,
    condition VARCHAR NOT NULL,
    k INTEGER,
    exclude_group BOOLEAN,
    exclude_duplicates BOOLEAN DEFAULT false, -- each query's duplicate cluster left out of its ranking
    duplicates_model VARCHAR,  -- with exclude_duplicates: whose near pairs joined the exact ones (NULL: exact only)
    query_split VARCHAR,
    gallery_split VARCHAR,
    modality VARCHAR,          -- NULL: every modality of the dataset
    sampled_queries BIGINT,    -- analyze --sample-queries N: N queries drawn (by class, seeded); NULL: all
    query_pool BIGINT,         -- with sampled_queries: the queries they were drawn from
    ci JSON,                   -- with sampled_queries: {"map_micro": [low, high], ...} bootstrap 95% over them
    n_queries BIGINT,
    n_skipped_queries BIGINT,  -- queries with R = 0
    n_gallery BIGINT,
    n_classes INTEGER,
    dim INTEGER,
    n_missing BIGINT,          -- labelled images without an embedding (--allow-partial); 0 normally
    purity_micro DOUBLE, purity_macro DOUBLE,
    map_micro DOUBLE, map_macro DOUBLE,              -- mean AP over the full ranking
    map_at_r_micro DOUBLE, map_at_r_macro DOUBLE,
    r_precision_micro DOUBLE, r_precision_macro DOUBLE,
    p_at_1_micro DOUBLE, p_at_1_macro DOUBLE,
    knn_acc_micro DOUBLE, knn_acc_macro DOUBLE,
    silhouette DOUBLE,
    davies_bouldin DOUBLE,
    calinski_harabasz DOUBLE,
    fisher_ratio DOUBLE,
    probe_balanced_accuracy DOUBLE,     -- mean over the probe's seeds (--probe-seeds)
    probe_balanced_accuracy_sd DOUBLE,  -- their sample standard deviation; NULL with one seed
    probe_protocol VARCHAR,             -- the probe's scheme in one line; details in provenance.linear_probe
    seconds DOUBLE,
    provenance JSON,           -- preprocessing, weights, index kind, library versions
    created_at TIMESTAMP,
    inputs_fingerprint VARCHAR -- of the run and options it was computed from: current while it matches
);

-- Overlay bias figures (vlmindex overlay effect): one row per figure of a (model, dataset, overlay
-- condition against clean, k, exclude_group); a rerun replaces them. Figures and baselines are
-- defined in docs/overlays.md; ci_low/ci_high: seeded percentile bootstrap 95% over queries.
CREATE TABLE IF NOT EXISTS overlay_effects (
    model VARCHAR NOT NULL,
    dataset VARCHAR NOT NULL,
    condition VARCHAR NOT NULL,
    k INTEGER,
    exclude_group BOOLEAN,
    figure VARCHAR NOT NULL,  -- delta_map, shift_cosine_mean, text_clustering_lift, flip_rate, ...
    value DOUBLE,             -- NULL when undefined; note says why
    ci_low DOUBLE,
    ci_high DOUBLE,
    n BIGINT,                 -- queries behind the figure
    baseline DOUBLE,          -- what to read the value against (clean value, chance, ...)
    n_boot INTEGER,
    seed INTEGER,
    note VARCHAR,
    created_at TIMESTAMP,
    inputs_fingerprint VARCHAR -- of both runs and the options: current while it matches
);

-- One row per scored query of an overlay effect (vlmindex overlay effect) and (k, exclude_group):
-- the overlaid query and its clean self, both ranked against the clean gallery. The attack figures
-- of overlay_effects are means of these columns (attack_delta_map = mean(ap_attack - ap_clean),
-- attack_success_rate = mean(attack_success)); vlmindex findings pairs them across models.
CREATE TABLE IF NOT EXISTS attack_queries (
    model VARCHAR NOT NULL,
    dataset VARCHAR NOT NULL,
    condition VARCHAR NOT NULL,
    k INTEGER,
    exclude_group BOOLEAN,
    image_id BIGINT NOT NULL,
    label VARCHAR,
    modality VARCHAR,
    written VARCHAR,              -- the text burned into the query
    ap_clean DOUBLE,
    ap_attack DOUBLE,
    knn_correct_clean BOOLEAN,
    knn_correct_attack BOOLEAN,
    attack_success BOOLEAN,       -- the kNN vote is the written class; NULL: the text writes no other class of its modality
    created_at TIMESTAMP,
    inputs_fingerprint VARCHAR    -- the overlay effect's: current while it matches
);

-- The paper's findings tested on this workspace (vlmindex findings; definitions in docs/findings.md):
-- one row per comparison of a finding and slice (dataset, modality, condition, scope), or one row
-- with comparison NULL where the finding is not testable. A rerun replaces the dataset's rows.
CREATE TABLE IF NOT EXISTS findings (
    dataset VARCHAR NOT NULL,
    modality VARCHAR,             -- NULL: all modalities
    condition VARCHAR NOT NULL,   -- (1), (2): the analysed condition; (3): the overlay condition
    scope VARCHAR,                -- the analyses' protocol (latest_summaries.scope, without the probe)
    finding INTEGER NOT NULL,     -- 1, 2 or 3
    claim VARCHAR,
    finding_verdict VARCHAR,      -- supported, contradicted, not decided, not testable
    finding_reason VARCHAR,
    comparison VARCHAR,           -- e.g. 'biomedclip vs hog (floor)'; NULL: nothing to compare
    a VARCHAR,                    -- a model, or 'family:NAME' for a family mean
    b VARCHAR,
    metric VARCHAR,               -- map_micro, knn_acc_macro, attack_delta_map, attack_success_rate, silhouette, fisher_ratio
    value_a DOUBLE,
    value_b DOUBLE,
    delta DOUBLE,                 -- value_a - value_b over the same queries
    ci_low DOUBLE,                -- group-bootstrap percentile interval of delta
    ci_high DOUBLE,
    expected VARCHAR,             -- what the claim predicts: 'a > b' or 'a < b'
    p_value DOUBLE,               -- two-sided bootstrap p of delta = 0
    p_holm DOUBLE,                -- Holm over the tested comparisons of the finding and slice
    verdict VARCHAR,              -- supported, contradicted, not decided; NULL: shown, not tested
    n_queries BIGINT,
    n_units BIGINT,               -- groups resampled
    analysis_ids VARCHAR[],       -- the analyses compared ((1), (2))
    effect_fingerprints VARCHAR[],  -- the overlay effects compared ((3))
    n_boot INTEGER,
    seed INTEGER,
    alpha DOUBLE,
    created_at TIMESTAMP
);

-- Zero-shot classification (vlmindex zeroshot): one row per (model, dataset, condition, modality);
-- modality 'all' pools every image. A rerun replaces a condition's rows.
CREATE TABLE IF NOT EXISTS zeroshot_results (
    model VARCHAR NOT NULL,
    dataset VARCHAR NOT NULL,
    condition VARCHAR NOT NULL,
    modality VARCHAR,
    n BIGINT,
    n_classes INTEGER,
    accuracy DOUBLE,
    balanced_accuracy DOUBLE,            -- mean recall over the classes present
    written_share DOUBLE,                -- overlays writing a class name: predicted = written class
    written_share_clean DOUBLE,          -- the same images' clean prediction = written class
    flip_rate DOUBLE,                    -- clean prediction != written, overlaid prediction = written
    n_prompts INTEGER,                   -- prompts per class
    prompts_sha256 VARCHAR,              -- of the exact prompts used, per modality and class
    created_at TIMESTAMP,
    inputs_fingerprint VARCHAR           -- of the runs, prompts and weights: current while it matches
);

-- Duplicate image pairs of a dataset (vlmindex duplicates), each once (image_id_a < image_id_b):
-- exact-bytes (same file sha256), exact-pixels (same decoded pixels, other bytes) and near (cosine
-- of one model's embeddings >= threshold). A rerun replaces the dataset's rows of its kind (exact),
-- or of its model and condition (near). same_*: the two images share split / group / label.
CREATE TABLE IF NOT EXISTS duplicates (
    dataset VARCHAR NOT NULL,
    image_id_a BIGINT NOT NULL,
    image_id_b BIGINT NOT NULL,
    kind VARCHAR NOT NULL,            -- exact-bytes, exact-pixels, near
    score DOUBLE,                     -- cosine for near pairs, 1.0 for exact ones
    model VARCHAR,                    -- near: the model whose embeddings were compared; NULL for exact
    condition VARCHAR,                -- near: the condition of those embeddings; NULL for exact
    threshold DOUBLE,                 -- near: the cosine threshold of the search
    same_split BOOLEAN,
    same_group BOOLEAN,
    same_label BOOLEAN,
    created_at TIMESTAMP,
    inputs_fingerprint VARCHAR        -- of the image rows (exact) or the run and threshold (near)
);

-- One row per duplicate search (exact, or near for one model and condition), also when it found
-- no pair: whether a dataset was searched at all, and on which inputs.
CREATE TABLE IF NOT EXISTS duplicate_searches (
    dataset VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,            -- exact (both exact kinds) or near
    model VARCHAR,
    condition VARCHAR,
    threshold DOUBLE,
    n_images BIGINT,                  -- images compared
    n_pairs BIGINT,
    seconds DOUBLE,
    created_at TIMESTAMP,
    inputs_fingerprint VARCHAR
);

-- The fingerprint of the pixels each image has under each condition: its file's sha256 when
-- clean; with an overlay, also the recipe and what decides the written text: the image's label
-- (label, wrong-label) and the class names of its modality (wrong-label, random-label). Embedding
-- parts and text detections store it per row; a row whose fingerprint is not the current one is
-- stale and never read.
CREATE OR REPLACE VIEW image_pixels AS
SELECT dataset, 'clean' AS condition, image_id, sha256 AS pixels FROM images
UNION ALL
SELECT i.dataset, c.name AS condition, i.image_id,
       sha256(concat_ws(chr(31), i.sha256, c.recipe::VARCHAR,
                        CASE WHEN json_extract_string(c.recipe, '$.text') IN ('label', 'wrong-label')
                             THEN coalesce(i.label, chr(0)) ELSE '' END,
                        CASE WHEN json_extract_string(c.recipe, '$.text') IN ('wrong-label', 'random-label')
                             THEN coalesce(p.pool, chr(0)) ELSE '' END))
FROM images i
JOIN conditions c ON c.dataset = i.dataset
LEFT JOIN (SELECT dataset, modality, string_agg(DISTINCT label, chr(31) ORDER BY label) AS pool
           FROM images WHERE label IS NOT NULL GROUP BY dataset, modality) p
       ON p.dataset = i.dataset AND p.modality IS NOT DISTINCT FROM i.modality;

-- The newest analysis for each (model, dataset, condition) and set of options; `scope` says what
-- its numbers are over. Every shipped analysis reads this view, so none mixes two settings.
CREATE OR REPLACE VIEW latest_summaries AS
SELECT s.*,
       concat_ws(' ', 'k=' || s.k, CASE WHEN s.exclude_group THEN 'group-excluded' END,
                 CASE WHEN s.probe_protocol IS NULL THEN 'no-probe' END,
                 CASE WHEN s.exclude_duplicates THEN 'duplicates-excluded' || coalesce('(near ' || s.duplicates_model || ')', '')
                 END,
                 'queries=' || s.query_split, 'gallery=' || s.gallery_split, 'modality=' || s.modality,
                 CASE WHEN s.n_missing > 0 THEN 'partial(' || s.n_missing || ' images without embedding)' END,
                 CASE WHEN s.sampled_queries IS NOT NULL
                      THEN 'sampled ' || s.sampled_queries || ' of ' || s.query_pool || ' queries (seed '
                           || coalesce(json_extract_string(s.provenance, '$.seed'), '0') || ')' END,
                 -- within-condition numbers of text that depends on the class (label, wrong-label):
                 -- the written word helps retrieval, so they are not comparable with clean ones
                 CASE WHEN json_extract_string(c.recipe, '$.text') IN ('label', 'wrong-label')
                      THEN 'text-tracks-class' END) AS scope
FROM summaries s
LEFT JOIN conditions c ON c.dataset = s.dataset AND c.name = s.condition
QUALIFY row_number() OVER (PARTITION BY s.model, s.dataset, s.condition, s.k, s.exclude_group,
                                        coalesce(s.exclude_duplicates, false), s.duplicates_model, s.query_split,
                                        s.gallery_split, s.modality, s.probe_protocol IS NULL, s.sampled_queries,
                                        CASE WHEN s.sampled_queries IS NOT NULL
                                             THEN json_extract_string(s.provenance, '$.seed') END
                           ORDER BY s.created_at DESC) = 1;
