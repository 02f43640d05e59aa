-- Headline metrics per modality (micro and class-macro), for every model, dataset, condition and analysis setting (latest of each).
WITH latest AS (SELECT analysis_id, scope FROM latest_summaries), per_class AS (
    -- unscored queries (R = 0) hold NULL metrics: avg() and count(metric) leave them out alike
    SELECT q.dataset, q.condition, q.model, q.modality, q.label, latest.scope,
           count(q.ap) AS n, avg(q.purity_at_k) AS purity, avg(q.ap) AS ap, avg(q.p_at_1) AS p1
    FROM query_metrics q JOIN latest USING (analysis_id)
    GROUP BY ALL
    HAVING count(q.ap) > 0
)
SELECT dataset, condition, model, modality,
       sum(n)                                   AS n,
       count(*)                                 AS n_classes,
       round(sum(purity * n) / sum(n), 4)       AS purity_at_k,
       round(avg(purity), 4)                    AS purity_at_k_macro,
       round(sum(ap * n) / sum(n), 4)           AS map,
       round(avg(ap), 4)                        AS map_macro,
       round(sum(p1 * n) / sum(n), 4)           AS p_at_1,
       scope
FROM per_class
GROUP BY ALL
ORDER BY dataset, condition, scope, modality, map DESC, model;
