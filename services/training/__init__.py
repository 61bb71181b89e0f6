"""The training service (`llmp.training.v1`): data preparation, pretraining, alignment and planning jobs."""
