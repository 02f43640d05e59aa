-- Headline metrics per modality (micro and class-macro), for every model, dataset and condition (latest analysis).
WITH latest AS (
    SELECT analysis_id FROM summaries
    QUALIFY row_number() OVER (PARTITION BY model, dataset, condition ORDER BY created_at DESC) = 1
), per_class AS (
    SELECT q.dataset, q.condition, q.model, q.modality, q.label, count(*) AS n,
           avg(q.purity_at_k) AS purity, avg(q.ap) AS ap, avg(q.p_at_1) AS p1
    FROM query_metrics q JOIN latest USING (analysis_id)
    GROUP BY ALL
)
SELECT dataset, condition, model, modality,
       sum(n)                                   AS n,
       count(*)                                 AS n_classes,
       round(sum(purity * n) / sum(n), 4)       AS purity_at_k,
       round(avg(purity), 4)                    AS purity_at_k_macro,
       round(sum(ap * n) / sum(n), 4)           AS map,
       round(avg(ap), 4)                        AS map_macro,
       round(sum(p1 * n) / sum(n), 4)           AS p_at_1
FROM per_class
GROUP BY ALL
ORDER BY dataset, condition, modality, map DESC, model;
