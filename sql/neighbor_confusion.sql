-- Which classes a class's top-k neighbours come from: share of neighbours per (query class, neighbour class).
WITH latest AS (
    SELECT analysis_id FROM summaries
    QUALIFY row_number() OVER (PARTITION BY model, dataset, condition ORDER BY created_at DESC) = 1
), counts AS (
    SELECT n.dataset, n.condition, n.model, qi.label AS query_label, ni.label AS neighbor_label,
           count(*) AS neighbors
    FROM neighbors n
    JOIN latest USING (analysis_id)
    JOIN images qi ON qi.image_id = n.image_id
    JOIN images ni ON ni.image_id = n.neighbor_id
    GROUP BY n.dataset, n.condition, n.model, qi.label, ni.label
)
SELECT *,
       round(neighbors / sum(neighbors) OVER (PARTITION BY dataset, condition, model, query_label), 4) AS share
FROM counts
ORDER BY dataset, condition, model, query_label, share DESC;
