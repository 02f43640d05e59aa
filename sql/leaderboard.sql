-- Models ranked per dataset, modality and condition by retrieval mAP, with the headline metrics (latest analysis of each).
SELECT dataset, condition, model, k,
       -- vlmindex fills the headline metrics from its metric registry (vlmindex.metrics.registry);
       -- `vlmindex sql --show leaderboard` prints the expanded text.
       {{leaderboard_metrics}},
       n_queries,
       scope,                  -- what the numbers are over: the options of the analysis
       json_extract(ci, '$.map_micro') AS map_ci,  -- sampled analyses: bootstrap 95% of map over the sample
       ci,                     -- sampled analyses: the interval of every retrieval figure (summaries columns)
       analysis_id NOT IN (SELECT analysis_id FROM stale_analyses) AS current,  -- false: inputs changed since
       modality,               -- NULL: every modality of the dataset (`analyze --per-modality`: one block each)
       analysis_id             -- joins query_metrics and the neighbors view
FROM latest_summaries
-- One block per dataset and modality (all modalities first), then per condition (clean first);
-- sampled analyses (--sample-queries) rank in a block of their own, after the full ones.
ORDER BY dataset, modality NULLS FIRST, condition <> 'clean', condition, sampled_queries NULLS FIRST,
         map DESC NULLS LAST, model;
