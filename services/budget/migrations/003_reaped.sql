-- Holds that expired without a Settle (the router died) are settled by the
-- reaper at their full reserved amount; `reaped` marks such provisional rows.
-- A late Settle or Release of the same request replaces the provisional
-- amount with the reported one once, and clears the flag.
ALTER TABLE budget.ledger ADD COLUMN reaped boolean NOT NULL DEFAULT false;
