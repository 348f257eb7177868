-- Images made for people (`certo image build --layers core|base`, `--package`,
-- `--root-password-file`): their extra packages and root password are a layer of their own,
-- of kind `custom`, recorded like the others (its inputs name the packages, never the
-- password). Core- and base-only images have no node type (an empty one).
ALTER TABLE image_layers DROP CONSTRAINT image_layers_kind_check;
ALTER TABLE image_layers ADD CONSTRAINT image_layers_kind_check
    CHECK (kind IN ('core', 'base', 'node_type', 'patch', 'custom'));
