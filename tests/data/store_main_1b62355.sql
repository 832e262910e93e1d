BEGIN TRANSACTION;
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    master_name TEXT,
    master_ip TEXT,
    master_port INTEGER,
    nodes TEXT NOT NULL DEFAULT '[]',
    command TEXT NOT NULL DEFAULT '[]',
    np INTEGER,
    timeout_s REAL,
    env_names TEXT NOT NULL DEFAULT '[]',
    remote_dir TEXT,
    pid INTEGER,
    exit_code INTEGER,
    error TEXT,
    reason TEXT,
    request TEXT NOT NULL DEFAULT '{}',
    flavour TEXT,
    failure TEXT NOT NULL DEFAULT 'null',
    submitted_by TEXT,
    cancelled_by TEXT,
    cancelled_at REAL,
    name TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    stalls TEXT NOT NULL DEFAULT '[]',
    run_id INTEGER
);
INSERT INTO "jobs" VALUES(1,'0190000000000a1b2c3d','running',1800000000.5,1800000001.0,NULL,NULL,NULL,NULL,'[["w-0", "10.0.0.1", 22, 1]]','["mpirun", "-np", "2", "a.out"]',NULL,NULL,'[]',NULL,NULL,NULL,NULL,NULL,'{"program": ["a.out"], "np": 2}',NULL,'null',NULL,NULL,NULL,'main-job','["team:a"]','[{"since": 1.0, "detected": 9.0}]',NULL);
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    hook TEXT NOT NULL,
    event TEXT NOT NULL,
    job_id TEXT NOT NULL,
    created REAL NOT NULL,
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT,
    UNIQUE (event_id, hook)
);
INSERT INTO "outbox" VALUES(1,'0190000000000a1b2c3d.job.started','h','job.started','0190000000000a1b2c3d',1800000001.0,X'7B226964223A20317D',0,1800000001.0,NULL);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    job_id TEXT,
    num_workers INTEGER NOT NULL,
    spec TEXT NOT NULL DEFAULT '{}',
    nodes TEXT NOT NULL DEFAULT '[]',
    notes TEXT NOT NULL DEFAULT '[]',
    submitted_by TEXT
);
INSERT INTO "runs" VALUES(1,'run-1','started',1.79647918276250028605e+09,NULL,'0190000000000a1b2c3d',2,'{"image": "x"}','["w-0"]','["a note"]','alice');
CREATE INDEX outbox_order ON outbox (hook, job_id, seq);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('jobs',1);
INSERT INTO "sqlite_sequence" VALUES('outbox',1);
INSERT INTO "sqlite_sequence" VALUES('runs',1);
COMMIT;
