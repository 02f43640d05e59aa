-- Duplicate pairs per dataset and kind (vlmindex duplicates): how many cross a split boundary (leakage), how many have different labels (label noise), and the images involved.
-- From table duplicates. kind: exact-bytes (same file), exact-pixels (same decoded pixels, other
-- bytes), near (cosine >= threshold between one model's embeddings of one condition); a pair can
-- be of several kinds. images: distinct images in at least one pair of the row; test_images: those
-- of them in the test split that have a duplicate outside it.
WITH pairs AS (
    SELECT d.dataset, d.kind, d.model, d.condition, d.threshold, d.image_id_a, d.image_id_b, d.same_split,
           d.same_label, ia.split AS split_a, ib.split AS split_b
    FROM duplicates d
    JOIN images ia ON ia.image_id = d.image_id_a
    JOIN images ib ON ib.image_id = d.image_id_b
), ends AS (
    SELECT dataset, kind, model, condition, image_id_a AS image_id, split_a AS split, NOT same_split AS crosses FROM pairs
    UNION ALL
    SELECT dataset, kind, model, condition, image_id_b, split_b, NOT same_split FROM pairs
), involved AS (
    SELECT dataset, kind, model, condition,
           count(DISTINCT image_id) AS images,
           count(DISTINCT image_id) FILTER (WHERE crosses AND split = 'test') AS test_images
    FROM ends GROUP BY ALL
)
SELECT p.dataset, p.kind, p.model, p.condition, any_value(p.threshold) AS threshold,
       count(*)                                    AS pairs,
       count(*) FILTER (WHERE NOT p.same_split)    AS cross_split,
       count(*) FILTER (WHERE NOT p.same_label)    AS label_mismatch,
       any_value(i.images)                         AS images,
       any_value(i.test_images)                    AS test_images
FROM pairs p
JOIN involved i ON i.dataset = p.dataset AND i.kind = p.kind
               AND i.model IS NOT DISTINCT FROM p.model AND i.condition IS NOT DISTINCT FROM p.condition
GROUP BY p.dataset, p.kind, p.model, p.condition
ORDER BY p.dataset, p.kind, p.model NULLS FIRST, p.condition;
