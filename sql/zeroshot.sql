-- Zero-shot accuracy per model, dataset and modality: clean against each overlay condition (deltas, and how often the prediction becomes the written class).
-- From table zeroshot_results (vlmindex zeroshot). modality 'all' pools every image. For
-- conditions writing a class name: written_share = predicted the written class; its clean
-- counterpart; flip_rate = clean prediction was not the written class and the overlaid one is.
SELECT o.dataset, o.model, o.modality, o.condition, o.n,
       round(c.accuracy, 4)                               AS acc_clean,
       round(o.accuracy, 4)                               AS acc,
       round(o.accuracy - c.accuracy, 4)                  AS d_acc,
       round(c.balanced_accuracy, 4)                      AS bal_acc_clean,
       round(o.balanced_accuracy, 4)                      AS bal_acc,
       round(o.balanced_accuracy - c.balanced_accuracy, 4) AS d_bal_acc,
       round(o.written_share_clean, 4)                    AS written_share_clean,
       round(o.written_share, 4)                          AS written_share,
       round(o.flip_rate, 4)                              AS flip_rate,
       o.prompts_sha256 = c.prompts_sha256                AS same_prompts
FROM zeroshot_results o
JOIN zeroshot_results c
  ON c.model = o.model AND c.dataset = o.dataset AND c.modality IS NOT DISTINCT FROM o.modality
 AND c.condition = 'clean'
ORDER BY o.dataset, o.model, o.modality = 'all', o.modality, o.condition <> 'clean', o.condition;
