BEGIN TRANSACTION;
CREATE TABLE instances (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    received_at REAL NOT NULL,
    calling_ae TEXT NOT NULL,
    images_in_acquisition INTEGER,
    temporal_positions INTEGER
);
INSERT INTO "instances" VALUES(1,'1.2.826.0.1.3680043.10.54321.1.1.1','1.2.826.0.1.3680043.10.54321.1','1.2.826.0.1.3680043.10.54321.1.1','1.2.840.10008.5.1.4.1.1.4','1.2.840.10008.1.2.1','instances/1.2.826.0.1.3680043.10.54321.1/1.2.826.0.1.3680043.10.54321.1.1/1.2.826.0.1.3680043.10.54321.1.1.1.dcm',9774,1.79666599729789137843e+09,'SCANNER',NULL,NULL);
INSERT INTO "instances" VALUES(2,'1.2.826.0.1.3680043.10.54321.1.1.2','1.2.826.0.1.3680043.10.54321.1','1.2.826.0.1.3680043.10.54321.1.1','1.2.840.10008.5.1.4.1.1.4','1.2.840.10008.1.2.1','instances/1.2.826.0.1.3680043.10.54321.1/1.2.826.0.1.3680043.10.54321.1.1/1.2.826.0.1.3680043.10.54321.1.1.2.dcm',9774,1.79666599734117913246e+09,'SCANNER',NULL,NULL);
CREATE TABLE job_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL,
        study_uid TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        owner TEXT NOT NULL,
        reopened INTEGER NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        outcome TEXT,
        audit_path TEXT,
        error TEXT
    );
INSERT INTO "job_history" VALUES(1,1,'1.2.826.0.1.3680043.10.54321.1',1,'old',0,1.79666599737092614174e+09,NULL,NULL,NULL,NULL);
CREATE TABLE jobs (
        job_id INTEGER PRIMARY KEY AUTOINCREMENT,
        study_uid TEXT NOT NULL,
        state TEXT NOT NULL,
        reopened INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        owner TEXT,
        lease_expires REAL,
        claimed_seq INTEGER,
        available_at REAL NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        last_error TEXT
    );
INSERT INTO "jobs" VALUES(1,'1.2.826.0.1.3680043.10.54321.1','processing',0,1,3,'old',1.79666605737092614173e+09,2,1.79666599736638808249e+09,1.79666599736638808249e+09,1.79666599737092614174e+09,NULL);
CREATE TABLE purged (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_key TEXT NOT NULL,
    purged_at REAL NOT NULL,
    reason TEXT NOT NULL,
    n_instances INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    delivered_at REAL NOT NULL
);
CREATE TABLE quarantine (
    sha256 TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    last_seq INTEGER NOT NULL,
    n_instances INTEGER NOT NULL,
    reopened INTEGER NOT NULL DEFAULT 0,
    times_done INTEGER NOT NULL DEFAULT 0,
    receiving_since REAL
);
INSERT INTO "studies" VALUES('1.2.826.0.1.3680043.10.54321.1','processing',1.79666599729789137843e+09,1.79666599734117913246e+09,2,2,0,0,1.79666599729789137843e+09);
CREATE INDEX instances_study ON instances(study_uid);
CREATE INDEX jobs_state ON jobs(state, available_at);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('instances',2);
INSERT INTO "sqlite_sequence" VALUES('jobs',1);
INSERT INTO "sqlite_sequence" VALUES('job_history',1);
COMMIT;
