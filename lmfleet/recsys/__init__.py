"""A sequential recommender (SASRec) on lmfleet's trainer and server: data, model, training,
evaluation and real-time serving."""
