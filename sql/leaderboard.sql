-- Models ranked per dataset and condition by retrieval mAP, with the headline metrics (latest analysis of each).
SELECT dataset, condition, model, k,
       round(map_micro, 4)          AS map,
       round(map_macro, 4)          AS map_macro,
       round(map_at_r_micro, 4)     AS map_at_r,
       round(p_at_1_micro, 4)       AS p_at_1,
       round(purity_micro, 4)       AS purity_at_k,
       round(purity_macro, 4)       AS purity_at_k_macro,
       round(knn_acc_macro, 4)      AS knn_acc_macro,
       round(silhouette, 4)         AS silhouette,
       round(probe_balanced_accuracy, 4) AS probe_bal_acc,
       n_queries,
       scope,                  -- what the numbers are over: the options of the analysis
       analysis_id             -- joins query_metrics and the neighbors view
FROM latest_summaries
ORDER BY dataset, condition, map DESC NULLS LAST, model;
