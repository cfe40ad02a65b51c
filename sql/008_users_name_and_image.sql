-- What the Kilo clients show of the signed-in user (`GET /api/profile`, `GET /api/user`):
-- a display name and an avatar, both optional; the service that writes users fills them.

ALTER TABLE users ADD COLUMN name text NULL, ADD COLUMN image_url text NULL;
