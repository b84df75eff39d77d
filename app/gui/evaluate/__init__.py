"""The Evaluate page's widgets: charts, results and the job that runs an evaluation."""
