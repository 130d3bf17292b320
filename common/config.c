/* config loading: see config.h */
