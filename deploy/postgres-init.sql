-- The two databases and their owners (compose runs this once, at the first start of the volume).
-- Prefect's migrations create the pg_trgm extension: its owner must be allowed to.
CREATE USER sopflow WITH PASSWORD 'sopflow';
CREATE USER prefect WITH PASSWORD 'prefect';
CREATE DATABASE sopflow OWNER sopflow;
CREATE DATABASE prefect OWNER prefect;
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
