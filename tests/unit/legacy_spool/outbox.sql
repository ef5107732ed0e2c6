BEGIN TRANSACTION;
CREATE TABLE deliveries (
        row_id INTEGER PRIMARY KEY AUTOINCREMENT,
        sop_uid TEXT NOT NULL,
        destination TEXT NOT NULL,
        study_uid TEXT NOT NULL,
        sop_class_uid TEXT NOT NULL,
        path TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        last_status_code INTEGER,
        sent_sop_uid TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        delivered_at REAL,
        UNIQUE (sop_uid, destination)
    );
INSERT INTO "deliveries" VALUES(1,'1.2.826.0.1.3680043.10.54321.9','pacs','1.2.826.0.1.3680043.10.54321.1','1.2.840.10008.5.1.4.1.1.4','/tmp/legacy_pg/spool/outbox/objects/1.2.826.0.1.3680043.10.54321.9.dcm','pending',0,1000.0,NULL,NULL,NULL,1000.0,1000.0,NULL);
CREATE INDEX deliveries_due ON deliveries(destination, state, next_attempt_at);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('deliveries',1);
COMMIT;
