-- Overlay bias per model, dataset and condition: typographic-attack figures (overlaid queries against the clean gallery) first, then within-condition deltas, embedding shift, text clustering, flip rate (95% bootstrap CIs).
-- One row per (dataset, condition, model, k, exclude_group) from table overlay_effects
-- (vlmindex overlay effect; every figure is defined in docs/overlays.md). *_ci columns: [low, high]
-- of the seeded percentile bootstrap over queries.
-- attack_*: overlaid queries ranked against the CLEAN gallery (own clean image and group left
-- out): map_clean = the clean -> clean mAP on the same gallery, attack_map, attack_d_map = paired
-- attack - clean; attack_success = share of queries (true class != written class) whose kNN vote
-- is the written class, attack_success_clean = the same share for the clean queries (no attack),
-- attack_success_chance = a vote drawn uniformly over the modality's classes.
-- d_*: WITHIN-condition deltas (overlaid queries against the overlaid gallery), which mix the
-- model reading the text with the text carrying the class. shift_cos: mean cosine of an image's clean and overlaid embedding (1 = unchanged;
-- near_cos = mean cosine of a clean image to its nearest clean neighbour, for scale).
-- text_share: neighbours carrying the query's overlaid string (text_share_clean: the same among its
-- clean neighbours); text_lift = text_share / chance. vote_change: share of kNN votes over the
-- clean gallery that the overlay changes. flip_rate: text that writes a class name (label,
-- wrong-label, random-label);
-- flip_base = share whose clean vote already was the written class; flip_chance = the flip rate if
-- changed votes fell on random other classes of the modality (with two classes in a modality every
-- change of vote is toward the written class, so flips cannot be told from disruption there).
-- NULL: see overlay_effects.note.
WITH f AS (
    SELECT *, printf('[%.4f, %.4f]', ci_low, ci_high) AS ci
    FROM overlay_effects
)
SELECT dataset, condition, model, k, exclude_group,
       max(n) FILTER (WHERE figure = 'shift_cosine_mean')                     AS n,
       round(max(baseline) FILTER (WHERE figure = 'attack_map'), 4)         AS map_clean,
       round(max(value) FILTER (WHERE figure = 'attack_map'), 4)            AS attack_map,
       round(max(value) FILTER (WHERE figure = 'attack_delta_map'), 4)      AS attack_d_map,
       max(ci) FILTER (WHERE figure = 'attack_delta_map')                   AS attack_d_map_ci,
       round(max(value) FILTER (WHERE figure = 'attack_knn_acc'), 4)        AS attack_knn_acc,
       round(max(value) FILTER (WHERE figure = 'attack_delta_knn_acc'), 4)  AS attack_d_knn_acc,
       max(ci) FILTER (WHERE figure = 'attack_delta_knn_acc')               AS attack_d_knn_acc_ci,
       round(max(value) FILTER (WHERE figure = 'attack_p_at_1'), 4)         AS attack_p_at_1,
       round(max(value) FILTER (WHERE figure = 'attack_success_rate'), 4)   AS attack_success,
       max(ci) FILTER (WHERE figure = 'attack_success_rate')                AS attack_success_ci,
       round(max(baseline) FILTER (WHERE figure = 'attack_success_rate'), 4) AS attack_success_clean,
       round(max(value) FILTER (WHERE figure = 'attack_success_chance'), 4) AS attack_success_chance,
       round(max(value) FILTER (WHERE figure = 'delta_map'), 4)             AS d_map,
       max(ci) FILTER (WHERE figure = 'delta_map')                          AS d_map_ci,
       round(max(value) FILTER (WHERE figure = 'delta_map_macro'), 4)       AS d_map_macro,
       round(max(value) FILTER (WHERE figure = 'delta_knn_acc_macro'), 4)   AS d_knn_acc_macro,
       max(ci) FILTER (WHERE figure = 'delta_knn_acc_macro')                AS d_knn_acc_macro_ci,
       round(max(value) FILTER (WHERE figure = 'shift_cosine_mean'), 4)     AS shift_cos,
       max(ci) FILTER (WHERE figure = 'shift_cosine_mean')                  AS shift_cos_ci,
       round(max(value) FILTER (WHERE figure = 'shift_cosine_std'), 4)      AS shift_cos_sd,
       round(max(baseline) FILTER (WHERE figure = 'shift_cosine_mean'), 4)  AS near_cos,
       round(max(value) FILTER (WHERE figure = 'text_clustering'), 4)       AS text_share,
       round(max(baseline) FILTER (WHERE figure = 'text_clustering'), 4)    AS text_share_clean,
       round(max(value) FILTER (WHERE figure = 'text_clustering_chance'), 4) AS text_chance,
       round(max(value) FILTER (WHERE figure = 'text_clustering_lift'), 3)  AS text_lift,
       max(ci) FILTER (WHERE figure = 'text_clustering_lift')               AS text_lift_ci,
       round(max(value) FILTER (WHERE figure = 'vote_change_rate'), 4)      AS vote_change,
       round(max(value) FILTER (WHERE figure = 'flip_rate'), 4)             AS flip_rate,
       max(ci) FILTER (WHERE figure = 'flip_rate')                          AS flip_rate_ci,
       round(max(value) FILTER (WHERE figure = 'flip_rate_chance'), 4)      AS flip_chance,
       round(max(baseline) FILTER (WHERE figure = 'flip_rate'), 4)          AS flip_base,
       max(created_at)                                                      AS created_at
FROM f
GROUP BY dataset, condition, model, k, exclude_group
ORDER BY dataset, condition, model, k, exclude_group;
