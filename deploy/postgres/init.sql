-- One PostgreSQL server, one database per store: Dagster's runs and events, MLflow's tracking
-- store, and the inference log. Run once by the postgres image on an empty data directory.
CREATE DATABASE dagster;
CREATE DATABASE mlflow;
CREATE DATABASE cxr;
