"""What a user does with a trained model and a run folder: predict, retrieve, export, plot."""
