-- The study's three findings tested on this workspace (vlmindex findings): each comparison with its verdict, and whether the analyses behind it are still the latest and current.
-- From table findings (docs/findings.md). finding_verdict: supported, contradicted, not decided,
-- not testable (finding_reason says why); verdict: of one comparison, NULL for figures shown side
-- by side. delta = value_a - value_b over the same queries; ci_low/ci_high: group-bootstrap 95%;
-- p_holm: Holm over the finding's tested comparisons in its slice. current is false once an
-- analysis or overlay effect it was computed from was replaced or its inputs changed: rerun
-- `vlmindex findings`.
WITH f AS (SELECT *, row_number() OVER () AS rid FROM findings),
gone AS (  -- rows computed from an analysis no longer the latest or current, or a replaced overlay effect
    SELECT rid FROM (SELECT rid, unnest(analysis_ids) AS a FROM f)
    WHERE a NOT IN (SELECT analysis_id FROM latest_summaries) OR a IN (SELECT analysis_id FROM stale_analyses)
    UNION
    SELECT rid FROM (SELECT rid, unnest(effect_fingerprints) AS x FROM f)
    WHERE x NOT IN (SELECT inputs_fingerprint FROM overlay_effects WHERE inputs_fingerprint IS NOT NULL)
)
SELECT f.dataset, f.modality, f.condition, f.scope, f.finding, f.finding_verdict, f.finding_reason,
       f.comparison, f.metric, round(f.value_a, 4) AS value_a, round(f.value_b, 4) AS value_b,
       round(f.delta, 4) AS delta, round(f.ci_low, 4) AS ci_low, round(f.ci_high, 4) AS ci_high, f.expected,
       f.p_holm, f.verdict, f.n_queries, f.n_units, f.rid NOT IN (SELECT rid FROM gone) AS current,
       f.claim, f.analysis_ids
FROM f
ORDER BY f.dataset, f.modality NULLS FIRST, f.finding, f.condition, f.comparison NULLS FIRST, f.metric;
