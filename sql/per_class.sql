-- Neighbour purity@k, mAP and kNN accuracy per class, for every model, dataset, condition and analysis setting (latest of each).
WITH latest AS (SELECT analysis_id, scope FROM latest_summaries)
SELECT q.dataset, q.condition, q.model, q.label,
       count(*)                          AS n,
       count(q.ap)                       AS n_scored,   -- queries with R > 0
       round(avg(q.purity_at_k), 4)      AS purity_at_k,
       round(avg(q.ap), 4)               AS map,
       round(avg(q.knn_correct::INT), 4) AS knn_acc,
       latest.scope
FROM query_metrics q JOIN latest USING (analysis_id)
GROUP BY ALL
ORDER BY q.dataset, q.condition, latest.scope, q.model, q.label;
