-- Jaccard@k of two models' neighbour sets per image, averaged per dataset and condition (every pair of models analysed with the same options).
WITH nb AS (
    -- the options of the analysis travel with each neighbour: only like is compared with like
    SELECT n.model, n.dataset, n.condition, n.image_id, n.neighbor_id, l.scope AS options
    FROM neighbors n JOIN latest_summaries l USING (analysis_id)
), sizes AS (
    SELECT model, dataset, condition, options, image_id, count(*) AS n FROM nb GROUP BY ALL
), pairs AS (
    SELECT a.dataset, a.condition, a.options, a.model AS model_a, bm.model AS model_b, a.image_id,
           count(*) FILTER (WHERE b.neighbor_id IS NOT NULL) AS shared
    FROM nb a
    JOIN (SELECT DISTINCT model, dataset, condition, options, image_id FROM nb) bm
      ON bm.dataset = a.dataset AND bm.condition = a.condition AND bm.options = a.options
     AND bm.image_id = a.image_id AND bm.model > a.model
    LEFT JOIN nb b
      ON b.dataset = a.dataset AND b.condition = a.condition AND b.options = a.options
     AND b.image_id = a.image_id AND b.model = bm.model AND b.neighbor_id = a.neighbor_id
    GROUP BY a.dataset, a.condition, a.options, a.model, bm.model, a.image_id
)
SELECT p.dataset, p.condition, p.model_a, p.model_b,
       count(*)                                                  AS images,
       round(avg(p.shared / (sa.n + sb.n - p.shared)), 4)        AS jaccard_at_k,
       round(quantile_cont(p.shared / (sa.n + sb.n - p.shared), 0.5), 4) AS median_jaccard,
       p.options
FROM pairs p
JOIN sizes sa ON sa.model = p.model_a AND sa.dataset = p.dataset AND sa.condition = p.condition
             AND sa.options = p.options AND sa.image_id = p.image_id
JOIN sizes sb ON sb.model = p.model_b AND sb.dataset = p.dataset AND sb.condition = p.condition
             AND sb.options = p.options AND sb.image_id = p.image_id
GROUP BY ALL
ORDER BY p.dataset, p.condition, p.options, jaccard_at_k DESC;
