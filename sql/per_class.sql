-- Neighbour purity@k, mAP and kNN accuracy per class, for every model, dataset and condition (latest analysis).
WITH latest AS (
    SELECT analysis_id FROM summaries
    QUALIFY row_number() OVER (PARTITION BY model, dataset, condition ORDER BY created_at DESC) = 1
)
SELECT q.dataset, q.condition, q.model, q.label,
       count(*)                          AS n,
       round(avg(q.purity_at_k), 4)      AS purity_at_k,
       round(avg(q.ap), 4)               AS map,
       round(avg(q.knn_correct::INT), 4) AS knn_acc
FROM query_metrics q JOIN latest USING (analysis_id)
GROUP BY ALL
ORDER BY q.dataset, q.condition, q.model, q.label;
