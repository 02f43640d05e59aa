-- Which classes a class's top-k neighbours come from: share of neighbours per (query class, neighbour class), per analysis setting.
WITH latest AS (SELECT analysis_id, scope FROM latest_summaries), counts AS (
    SELECT n.dataset, n.condition, n.model, qi.label AS query_label, ni.label AS neighbor_label,
           latest.scope, count(*) AS neighbors
    FROM neighbors n
    JOIN latest USING (analysis_id)
    JOIN images qi ON qi.image_id = n.image_id
    JOIN images ni ON ni.image_id = n.neighbor_id
    GROUP BY n.dataset, n.condition, n.model, qi.label, ni.label, latest.scope
)
SELECT dataset, condition, model, query_label, neighbor_label, neighbors,
       round(neighbors / sum(neighbors) OVER (PARTITION BY dataset, condition, model, scope, query_label), 4)
           AS share,
       scope
FROM counts
ORDER BY dataset, condition, scope, model, query_label, share DESC;
