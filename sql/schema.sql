-- vlmindex catalog schema. Table and column names are an interface users write SQL against:
-- add columns freely, never rename. Bump SCHEMA_VERSION in workspace.py and add a migration when
-- an existing workspace needs changing.
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
    ingested_at TIMESTAMP
);

-- Files an ingest could not use, with the reason: a silently dropped image skews a study.
CREATE TABLE IF NOT EXISTS skipped (
    dataset VARCHAR NOT NULL,
    path VARCHAR NOT NULL,
    reason VARCHAR NOT NULL,
    skipped_at TIMESTAMP
);

CREATE TABLE IF NOT EXISTS conditions (
    dataset VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    recipe JSON NOT NULL,
    created_at TIMESTAMP,
    PRIMARY KEY (dataset, name)
);
